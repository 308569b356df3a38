"""Moving KV between a serving engine's paged cache and chunk buffers (gather on store, scatter
on load), by slot mapping. ``gather``/``scatter`` pick the Triton kernel for CUDA tensors and the
block-wise torch path (``block_copy.py``) otherwise; on the CPU ``scatter`` first tries the
compiled row loop (``paged_rows.py``: at memcpy speed in ``benchmarks/kernel_bench.py``). All
give results bit-identical to the per-token definition in ``reference.py`` (tested)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcache_ext.kernels import block_copy, paged_rows
from lmcache_ext.kernels.layouts import (
    PagedKV,
    PagedLayout,
    UnsupportedLayout,
    check_chunk,
    paged_kv,
    paged_kv_layers,
)

__all__ = ["PagedKV", "PagedLayout", "UnsupportedLayout", "gather", "paged_kv",
           "paged_kv_layers", "prepare", "scatter"]


def _use_triton(views: Sequence[PagedKV]) -> bool:
    return bool(views) and views[0].k.is_cuda


def prepare(views: Sequence[PagedKV]) -> None:
    """Get ready to copy through ``views``: on CUDA, build the kernel's per-layer pointer tables
    (a small host-to-device copy) now, at register time, rather than at the first chunk. The
    views must stay alive (and their tensors unmoved) while they are used; no-op on the CPU."""
    if _use_triton(views):
        from lmcache_ext.kernels import triton_paged  # imported lazily: triton is optional
        triton_paged.prepare(views)


def gather(views: Sequence[PagedKV], slots: torch.Tensor, chunk: torch.Tensor,
           host_slots: torch.Tensor | None = None) -> None:
    """Copy the KV at ``slots`` (negative = skip) of every layer into ``chunk``
    ``[layers, 2, tokens, kv_heads, head_dim]``. Raises ValueError on a shape/dtype mismatch or a
    slot past the cache.

    On CUDA, one kernel launch for all layers. ``slots`` may be on the CPU (bounds-checked there,
    then copied: asynchronously when pinned) or on the GPU with ``host_slots`` its host copy
    (checked on the host: no device sync). Device slots without a host copy are not checked,
    only kept inside the cache by the kernel (``layouts.check_chunk``)."""
    if _use_triton(views):
        from lmcache_ext.kernels import triton_paged
        triton_paged.gather(views, slots, chunk, host_slots)
    else:
        block_copy.gather(views, slots, chunk)


def scatter(chunk: torch.Tensor, views: Sequence[PagedKV], slots: torch.Tensor,
            host_slots: torch.Tensor | None = None) -> None:
    """Copy ``chunk`` into the KV at ``slots`` (negative = skip) of every layer; ``slots`` and
    ``host_slots`` as for ``gather``."""
    if _use_triton(views):
        from lmcache_ext.kernels import triton_paged
        triton_paged.scatter(chunk, views, slots, host_slots)
        return
    check_chunk(views, chunk, slots)
    if not paged_rows.scatter_rows(chunk, views, slots):
        block_copy.scatter(chunk, views, slots)
