"""Triton gather/scatter between paged KV views and chunk buffers, by slot mapping.

One program per (token, layer); it moves that token's K and V rows (``heads x head_dim``) with
masked loads/stores at the view's own strides, so non-contiguous layouts need no copy. Values are
moved as same-width integers: a copy must be bit-exact for every float format (fp8 included) and
integer loads/stores cannot round. Negative slots are skipped (masked). ``reference.py`` defines
the answer; tests run this file with ``TRITON_INTERPRET=1`` on the CPU and compare bit-exactly.

All layers must be views of one storage with one layer stride (true for vLLM's single KV buffer)
to use the single-launch path; otherwise each layer is its own launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from lmcache_ext.kernels.layouts import PagedKV, check_chunk

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_kernel(cache_k, cache_v, chunk, slots, block_size,
                 kb, kn, kh, kd, vb, vn, vh, vd,  # cache view strides (elements)
                 cl, ckv, ct, ch, cd,  # chunk strides [layers, 2, tokens, heads, dim]
                 layer_k, layer_v,  # per-layer offset of the cache views (elements)
                 HEADS: tl.constexpr, DIM: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TO_CHUNK: tl.constexpr):
    token = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots + token).to(tl.int64)
    block = slot // block_size
    pos = slot % block_size
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # The slot is broadcast to the tile before comparing: the interpreter rejects a scalar
    # boolean combined with a tensor mask. (Plain arithmetic, not tl.zeros: triton's standard
    # library helpers are compiled-only when triton was imported before TRITON_INTERPRET.)
    mask = ((h * 0 + d * 0 + slot) >= 0) & (h < HEADS) & (d < DIM)
    k_at = cache_k + layer * layer_k + block * kb + pos * kn + h * kh + d * kd
    v_at = cache_v + layer * layer_v + block * vb + pos * vn + h * vh + d * vd
    c_at = chunk + layer * cl + token * ct + h * ch + d * cd
    if TO_CHUNK:
        tl.store(c_at, tl.load(k_at, mask=mask), mask=mask)
        tl.store(c_at + ckv, tl.load(v_at, mask=mask), mask=mask)
    else:
        tl.store(k_at, tl.load(c_at, mask=mask), mask=mask)
        tl.store(v_at, tl.load(c_at + ckv, mask=mask), mask=mask)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t if not t.is_floating_point() else t.view(_BITS[t.element_size()])


def _layer_stride(views: Sequence[PagedKV], attr: str) -> int | None:
    """The constant element distance between consecutive layers' views, if there is one."""
    tensors = [getattr(v, attr) for v in views]
    if len(tensors) == 1:
        return 0
    size = tensors[0].element_size()
    if any(t.untyped_storage().data_ptr() != tensors[0].untyped_storage().data_ptr()
           or t.stride() != tensors[0].stride() for t in tensors):
        return None
    steps = {(b.data_ptr() - a.data_ptr()) for a, b in zip(tensors, tensors[1:], strict=False)}
    if len(steps) != 1 or next(iter(steps)) % size:
        return None
    return next(iter(steps)) // size


def _launch(views: Sequence[PagedKV], chunk: torch.Tensor, slots: torch.Tensor,
            to_chunk: bool) -> None:
    check_chunk(views, chunk, slots)
    if slots.numel() == 0:
        return
    slots = slots.to(device=views[0].k.device, dtype=torch.int64).contiguous()
    chunk_bits = _bits(chunk)
    k_step, v_step = _layer_stride(views, "k"), _layer_stride(views, "v")
    # One launch for all layers when they share a storage at a constant stride; else per layer.
    groups = [(0, views)] if k_step is not None and v_step is not None else [
        (i, [v]) for i, v in enumerate(views)]
    heads, dim = views[0].k.shape[2], views[0].k.shape[3]
    for first, group in groups:
        k, v = _bits(group[0].k), _bits(group[0].v)
        part = chunk_bits[first:first + len(group)]
        _copy_kernel[(slots.shape[0], len(group))](
            k, v, part, slots, group[0].block_size, *k.stride(), *v.stride(),
            part.stride(0), part.stride(1), part.stride(2), part.stride(3), part.stride(4),
            k_step or 0, v_step or 0, HEADS=heads, DIM=dim,
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim),
            TO_CHUNK=to_chunk)


def gather(views: Sequence[PagedKV], slots: torch.Tensor, chunk: torch.Tensor) -> None:
    """Copy the KV at ``slots`` of every layer into ``chunk`` ``[layers, 2, tokens, H, D]``."""
    _launch(views, chunk, slots, to_chunk=True)


def scatter(chunk: torch.Tensor, views: Sequence[PagedKV], slots: torch.Tensor) -> None:
    """Copy ``chunk`` ``[layers, 2, tokens, H, D]`` into the KV at ``slots`` of every layer."""
    _launch(views, chunk, slots, to_chunk=False)
