"""Paged KV seen as rows of ``head_dim`` elements, for compiled CPU loops (numba) that write
whole rows where they belong: ``scatter_rows`` (a raw chunk into the blocks) here, and
``codecs.paged_decode`` (a quantized chunk decoded into them).

``PagedRows`` holds every layer's K and V memory as flat numpy arrays from the view's first
element (2-byte dtypes as int16, 4-byte as int32: a copy moves bits, never values) and the
element strides every layer's view shares; a layer set whose views differ in strides, or whose
rows are not contiguous, has none (the torch path in ``block_copy`` copies those).

The loops are compiled on first use (about a second per loop, then cached on disk); without
numba, or where it cannot be set up (``loops()`` is None, logged once), callers keep the torch
path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from lmcache_ext.kernels.layouts import LayerSetMemo, PagedKV

log = logging.getLogger(__name__)

_BITS = {2: torch.int16, 4: torch.int32}  # element size -> the integer its bits are copied as


@dataclass(frozen=True)
class PagedRows:
    """Every layer's K and V memory as flat arrays, and the element strides of an element at
    (block, position, head, channel): ``[block, position, head, block_size]`` (channel: 1)."""

    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]
    key_strides: np.ndarray
    value_strides: np.ndarray


def _rows(views: Sequence[PagedKV]) -> PagedRows | None:
    """Memoized (``paged_rows``): the arrays keep the cache's tensors alive until another
    layer set replaces them (a worker registers its caches once)."""
    first = views[0].k
    if first.device.type != "cpu" or first.element_size() not in _BITS:
        return None
    found = []
    for side in ([v.k for v in views], [v.v for v in views]):
        strides = side[0].stride()
        if strides[-1] != 1 or any(t.stride() != strides or t.dtype != first.dtype
                                   for t in side):
            return None
        arrays = tuple(flat_bits(t) for t in side)
        found.append((arrays, np.array([*strides[:3], side[0].shape[1]], dtype=np.int64)))
    (keys, key_strides), (values, value_strides) = found
    return PagedRows(keys, values, key_strides, value_strides)


def flat_bits(tensor: torch.Tensor) -> np.ndarray:
    """The memory ``tensor`` spans (strides >= 0), from its first element to its last, as one
    flat array of the integer its element size copies as (``tensor``'s dtype: 2 or 4 bytes)."""
    extent = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True))
    return tensor.as_strided((extent,), (1,)).view(_BITS[tensor.element_size()]).numpy()


_MEMO = LayerSetMemo(_rows)


def paged_rows(views: Sequence[PagedKV]) -> PagedRows | None:
    """The views as ``PagedRows``; None where they are not on the CPU, not of a 2- or 4-byte
    dtype, not alike in every layer or not contiguous along ``head_dim``."""
    return _MEMO.get(views) if views else None


_loops: ModuleType | bool | None = None


def loops() -> ModuleType | None:
    """``paged_rows_loop`` (the compiled loops), or None where numba cannot be imported or
    set up (it raises at import when no cache directory is writable)."""
    global _loops
    if _loops is None:
        try:
            from lmcache_ext.kernels import paged_rows_loop
        except Exception as exc:  # ImportError, or numba's RuntimeError for its cache
            log.warning("lmcache-ext: the compiled CPU copy loops are unavailable (%s: %s): "
                        "chunks are copied into vLLM's CPU blocks by torch, and quantized ones "
                        "decoded first (slower)", type(exc).__name__, exc)
            _loops = False
        else:
            _loops = paged_rows_loop
    return _loops or None


def scatter_rows(chunk: torch.Tensor, views: Sequence[PagedKV], slots: torch.Tensor) -> bool:
    """``chunk`` ``[layers, 2, tokens, heads, head_dim]`` (rows contiguous, the views' dtype;
    checked by the caller, as ``block_copy.scatter`` does) into the views at ``slots``
    (negative: skipped). False, nothing written, where the views have no ``PagedRows``, the
    chunk's rows are not contiguous or numba is missing."""
    rows = paged_rows(views)
    compiled = loops()
    if rows is None or compiled is None or chunk.stride(-1) != 1:
        return False
    if not chunk.numel():
        return True  # no tokens: nothing to write
    layers, _, _, heads, dim = chunk.shape
    compiled.scatter_rows(flat_bits(chunk), np.array(chunk.stride()[:4], dtype=np.int64),
                          layers, heads, dim, slots.numpy(), rows.keys, rows.key_strides,
                          rows.values, rows.value_strides)
    return True
