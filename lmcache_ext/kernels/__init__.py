"""Moving KV between a serving engine's paged cache and chunk buffers (gather on store, scatter
on load), by slot mapping. ``gather``/``scatter`` pick the Triton kernel for CUDA tensors and the
block-wise torch path (``block_copy.py``) otherwise; both give results bit-identical to the
per-token definition in ``reference.py`` (tested)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcache_ext.kernels import block_copy
from lmcache_ext.kernels.layouts import (
    PagedKV,
    PagedLayout,
    UnsupportedLayout,
    paged_kv,
    paged_kv_layers,
)

__all__ = ["PagedKV", "PagedLayout", "UnsupportedLayout", "gather", "paged_kv",
           "paged_kv_layers", "scatter"]


def _use_triton(views: Sequence[PagedKV]) -> bool:
    return bool(views) and views[0].k.is_cuda


def gather(views: Sequence[PagedKV], slots: torch.Tensor, chunk: torch.Tensor) -> None:
    """Copy the KV at ``slots`` (negative = skip) of every layer into ``chunk``
    ``[layers, 2, tokens, kv_heads, head_dim]``. Raises ValueError on a shape/dtype mismatch."""
    if _use_triton(views):
        from lmcache_ext.kernels import triton_paged  # imported lazily: triton is optional
        triton_paged.gather(views, slots, chunk)
    else:
        block_copy.gather(views, slots, chunk)


def scatter(chunk: torch.Tensor, views: Sequence[PagedKV], slots: torch.Tensor) -> None:
    """Copy ``chunk`` into the KV at ``slots`` (negative = skip) of every layer."""
    if _use_triton(views):
        from lmcache_ext.kernels import triton_paged
        triton_paged.scatter(chunk, views, slots)
    else:
        block_copy.scatter(chunk, views, slots)
