"""Triton gather/scatter between paged KV views and chunk buffers, by slot mapping.

One launch per chunk for all layers: program ``(token, layer)`` reads that layer's K and V base
addresses from two device tables of per-layer pointers (int64 ``data_ptr()``s, built once per
layer set: ``prepare``), and moves the token's K and V rows (``heads x head_dim``) with masked
loads/stores at the views' own strides, so non-contiguous layouts need no copy. This serves
vLLM 0.23 (one allocation per layer) and vLLM >= 0.26 (per-layer views of one buffer) alike.
Layers whose views have different strides go in separate launches, one per stride group.

Values move as same-width integers: a copy must be bit-exact for every float format (fp8
included) and integer loads/stores cannot round. Every index product is int64 (a 70B layer can
pass 2**31 elements). Negative slots are skipped (masked), and so is any slot past the cache: the
kernel never touches memory outside a view, even for a slot mapping nobody checked (the host-side
check that raises is ``layouts.check_chunk``). ``reference.py`` defines the answer; tests run
this file with ``TRITON_INTERPRET=1`` on the CPU and compare bit-exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lmcache_ext.kernels.layouts import LayerSetMemo, PagedKV, check_chunk

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _copy_kernel(k_table, v_table, chunk, slots, block_size, num_slots,
                 kb, kn, kh, kd, vb, vn, vh, vd,  # cache view strides (elements)
                 cl, ckv, ct, ch, cd,  # chunk strides [layers, 2, tokens, heads, dim]
                 HEADS: tl.constexpr, DIM: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TO_CHUNK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    # This layer's K and V views, as pointers of the chunk's (integer) element type.
    element = tl.pointer_type(chunk.dtype.element_ty)
    cache_k = tl.load(k_table + layer).to(element)
    cache_v = tl.load(v_table + layer).to(element)
    slot = tl.load(slots + token).to(tl.int64)
    block = slot // block_size
    pos = slot % block_size
    h = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]
    d = tl.arange(0, BLOCK_D).to(tl.int64)[None, :]
    # The slot is broadcast to the tile before comparing: the interpreter rejects a scalar
    # boolean combined with a tensor mask. (Plain arithmetic, not tl.zeros: triton's standard
    # library helpers are compiled-only when triton was imported before TRITON_INTERPRET.)
    at = h * 0 + d * 0 + slot
    mask = (at >= 0) & (at < num_slots) & (h < HEADS) & (d < DIM)
    k_at = cache_k + block * kb + pos * kn + h * kh + d * kd
    v_at = cache_v + block * vb + pos * vn + h * vh + d * vd
    c_at = chunk + layer * cl + token * ct + h * ch + d * cd
    if TO_CHUNK:
        tl.store(c_at, tl.load(k_at, mask=mask), mask=mask)
        tl.store(c_at + ckv, tl.load(v_at, mask=mask), mask=mask)
    else:
        tl.store(k_at, tl.load(c_at, mask=mask), mask=mask)
        tl.store(v_at, tl.load(c_at + ckv, mask=mask), mask=mask)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t if not t.is_floating_point() else t.view(_BITS[t.element_size()])


@dataclass(frozen=True)
class _Group:
    """Layers ``[first, first + count)``, whose K views share one stride tuple and V views
    another, and their base addresses as int64 device tables ``[count]``."""

    first: int
    count: int
    k_strides: tuple[int, ...]
    v_strides: tuple[int, ...]
    k_table: torch.Tensor
    v_table: torch.Tensor


@dataclass(frozen=True)
class PointerTables:
    """A layer set's per-layer pointer tables, in as few stride groups as the layers allow
    (one for every vLLM layout). Holds only addresses: the views must outlive it."""

    groups: tuple[_Group, ...]


def _table(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[len(tensors)]`` int64 base addresses on ``device`` (built on the host, copied once)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device)


def build_tables(views: Sequence[PagedKV]) -> PointerTables:
    """Group consecutive layers by (K strides, V strides) and table their base addresses."""
    device, groups, first = views[0].k.device, [], 0
    for index in range(1, len(views) + 1):
        if index < len(views) and views[index].k.stride() == views[first].k.stride() \
                and views[index].v.stride() == views[first].v.stride():
            continue
        part = views[first:index]
        groups.append(_Group(first, len(part), views[first].k.stride(), views[first].v.stride(),
                             _table([v.k for v in part], device),
                             _table([v.v for v in part], device)))
        first = index
    return PointerTables(tuple(groups))


# The tables of the last layer set: built once (``prepare`` builds them at register time).
_TABLES = LayerSetMemo(build_tables)


def prepare(views: Sequence[PagedKV]) -> PointerTables:
    """Build (or find) the pointer tables of ``views``: call once when the caches are
    registered, so the first copy does not pay the table's host-to-device copy."""
    return _TABLES.get(views)


def _device_slots(slots: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``slots`` on ``device``: as they are when already there; else copied, asynchronously
    from pinned memory (the caller keeps a pinned host tensor unchanged until the copy ran)."""
    if slots.device == device:
        return slots.contiguous()
    return slots.to(device=device, non_blocking=slots.is_pinned()).contiguous()


def _run(views: Sequence[PagedKV], chunk: torch.Tensor, slots: torch.Tensor,
         to_chunk: bool) -> None:
    """The launches (one per stride group: one for every vLLM layout), unchecked."""
    if slots.numel() == 0:
        return
    slots = _device_slots(slots, views[0].k.device)
    chunk_bits = _bits(chunk)
    heads, dim = views[0].k.shape[2], views[0].k.shape[3]
    for group in _TABLES.get(views).groups:
        part = chunk_bits[group.first:group.first + group.count]
        _copy_kernel[(slots.shape[0], group.count)](
            group.k_table, group.v_table, part, slots, views[0].block_size, views[0].num_slots,
            *group.k_strides, *group.v_strides, *part.stride(), HEADS=heads, DIM=dim,
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim),
            TO_CHUNK=to_chunk)


def gather(views: Sequence[PagedKV], slots: torch.Tensor, chunk: torch.Tensor,
           host_slots: torch.Tensor | None = None) -> None:
    """Copy the KV at ``slots`` of every layer into ``chunk`` ``[layers, 2, tokens, H, D]``;
    see ``kernels.gather`` for ``slots``/``host_slots``."""
    check_chunk(views, chunk, slots, host_slots)
    _run(views, chunk, slots, to_chunk=True)


def scatter(chunk: torch.Tensor, views: Sequence[PagedKV], slots: torch.Tensor,
            host_slots: torch.Tensor | None = None) -> None:
    """Copy ``chunk`` ``[layers, 2, tokens, H, D]`` into the KV at ``slots`` of every layer."""
    check_chunk(views, chunk, slots, host_slots)
    _run(views, chunk, slots, to_chunk=False)
