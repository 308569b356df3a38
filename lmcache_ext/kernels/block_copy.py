"""CPU gather/scatter between paged KV views and chunk buffers, a block at a time.

Copying token rows one by one (``reference.py``) runs at a fraction of memcpy; slot mappings are
nearly always whole blocks and runs of consecutive positions, so this path copies those as
strided blocks instead: ``slot_plan.plan_copy`` says which rows go how, and each layer group
moves them with a few calls. Layers that are views of one buffer at a constant stride (vLLM's
single KV buffer) are seen as one ``[layers, 2, blocks, block_size, H, D]`` view, so a 256-token
chunk is a handful of copies for all layers at once; other layers go one by one. Rows the plan
leaves to the per-token fallback go through ``reference.gather_rows``/``scatter_rows``.

Bit-identical to ``reference.py`` (tested): same-dtype copies only, never arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmcache_ext.kernels import reference
from lmcache_ext.kernels.layouts import LayerSetMemo, PagedKV, check_chunk
from lmcache_ext.kernels.slot_plan import CopyPlan, plan_copy


def _overlaps(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """True unless each dim's stride clears everything the smaller-stride dims span (a
    sufficient test: False means no two indices share an element)."""
    extent = 1
    for stride, size in sorted((s, n) for s, n in zip(strides, sizes, strict=True) if n > 1):
        if stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def _stack(parts: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor | None:
    """``parts[i][j]`` (same shape ``[B, N, H, D]`` and strides) as one view ``[len(parts),
    len(parts[0]), B, N, H, D]`` when they sit at constant, non-negative steps in one storage
    without overlapping; else None."""
    first = parts[0][0]
    if any(t.stride() != first.stride() or t.shape != first.shape or t.dtype != first.dtype
           for row in parts for t in row):
        return None
    base, size = first.data_ptr(), first.element_size()
    layer_step = parts[1][0].data_ptr() - base if len(parts) > 1 else 0  # bytes
    kv_step = parts[0][1].data_ptr() - base if len(parts[0]) > 1 else 0
    if min(layer_step, kv_step) < 0 or layer_step % size or kv_step % size or any(
            t.data_ptr() != base + i * layer_step + j * kv_step
            for i, row in enumerate(parts) for j, t in enumerate(row)):
        return None
    shape = (len(parts), len(parts[0]), *first.shape)
    stride = (layer_step // size, kv_step // size, *first.stride())
    if _overlaps(shape, stride):
        return None
    try:  # also refuses a view past the first tensor's storage (another allocation)
        return first.as_strided(shape, stride, first.storage_offset())
    except RuntimeError:
        return None


@dataclass(frozen=True)
class _Stack:
    """Layers ``[layer, layer + layers)`` and K/V ``[kv, kv + kvs)`` as one view over the K (kv
    0) or V (kv 1) tensor of ``layer``, at ``layer_step``/``kv_step`` elements."""

    layer: int
    layers: int
    kv: int
    kvs: int
    layer_step: int
    kv_step: int

    def view(self, views: Sequence[PagedKV]) -> torch.Tensor:  # [G, K, B, N, H, D]
        base = views[self.layer].k if self.kv == 0 else views[self.layer].v
        return base.as_strided((self.layers, self.kvs, *base.shape),
                               (self.layer_step, self.kv_step, *base.stride()),
                               base.storage_offset())


def _stacks(views: Sequence[PagedKV]) -> tuple[_Stack, ...]:
    """Stacks covering every layer's K and V once: all layers at once when they stack, else
    per layer (or per K/V)."""
    whole = _stack([(v.k, v.v) for v in views])
    if whole is not None:
        return (_Stack(0, len(views), 0, 2, whole.stride(0), whole.stride(1)),)
    stacks = []
    for layer, view in enumerate(views):
        both = _stack([(view.k, view.v)])
        if both is not None:
            stacks.append(_Stack(layer, 1, 0, 2, 0, both.stride(1)))
        else:
            stacks += [_Stack(layer, 1, kv, 1, 0, 0) for kv in (0, 1)]
    return tuple(stacks)


_MEMO = LayerSetMemo(_stacks)  # the strides of the last layer set, checked once


def _wordable(t: torch.Tensor) -> bool:
    """Whether ``t.view(torch.int64)`` works: contiguous 8-byte-sized rows at 8-byte steps."""
    size = t.element_size()
    return t.stride(-1) == 1 and all(
        n * size % 8 == 0 for n in (t.shape[-1], t.storage_offset(), *t.stride()[:-1]))


def _words(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors viewed as int64 (rows of 2-byte values copy a quarter as many elements,
    and integers cannot round) when all of them allow it, else as they are."""
    if tensors[0].element_size() >= 8 or not all(_wordable(t) for t in tensors):
        return tensors
    return tuple(t.view(torch.int64) for t in tensors)


def _pairs(views: Sequence[PagedKV],
           chunk: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(chunk part [G, K, T, H, D], cache part [G, K, B, N, H, D])`` pairs covering every
    layer's K and V once, in the same dtype (int64 words where possible)."""
    pairs = []
    for s in _MEMO.get(views):
        part = chunk[s.layer:s.layer + s.layers, s.kv:s.kv + s.kvs]
        pairs.append(_words(part, s.view(views)))
    return pairs


def _group_rows(part: torch.Tensor, row: int, blocks: int, block_size: int) -> torch.Tensor:
    """Rows ``[row, row + blocks * block_size)`` of ``part`` as ``[G, K, blocks, N, H, D]``."""
    return part.narrow(2, row, blocks * block_size).unflatten(2, (blocks, block_size))


def _span_slots(cache: torch.Tensor, slot: int, length: int, block_size: int) -> torch.Tensor:
    """Slots ``[slot, slot + length)`` (one block) of ``cache`` as ``[G, K, length, H, D]``."""
    return cache.select(2, slot // block_size).narrow(2, slot % block_size, length)


def _gather_pair(plan: CopyPlan, indices: list[torch.Tensor | None], block_size: int,
                 cache: torch.Tensor, part: torch.Tensor) -> None:
    """``part`` ``[G, K, T, H, D]`` <- ``cache`` ``[G, K, B, N, H, D]`` for the plan's groups
    and spans; ``indices[i]``: group i's blocks as a tensor, None when they are one run."""
    for group, index in zip(plan.groups, indices, strict=True):
        dest = _group_rows(part, group.row, len(group.blocks), block_size)
        if index is None:  # one run of consecutive blocks: one strided copy
            dest.copy_(cache.narrow(2, group.blocks[0], len(group.blocks)))
        else:  # block_size rows per index, all layers at once
            torch.index_select(cache, 2, index, out=dest)
    for span in plan.spans:
        part.narrow(2, span.row, span.length).copy_(
            _span_slots(cache, span.slot, span.length, block_size))


def _scatter_pair(plan: CopyPlan, block_size: int, part: torch.Tensor,
                  cache: torch.Tensor) -> None:
    """``cache`` ``[G, K, B, N, H, D]`` <- ``part`` ``[G, K, T, H, D]`` for the plan's groups
    and spans. index_copy_ would move one element at a time: a copy per run of consecutive
    blocks moves whole rows instead."""
    for group in plan.groups:
        src = _group_rows(part, group.row, len(group.blocks), block_size)
        for index, block, count in group.runs:
            cache.narrow(2, block, count).copy_(src.narrow(2, index, count))
    for span in plan.spans:
        _span_slots(cache, span.slot, span.length, block_size).copy_(
            part.narrow(2, span.row, span.length))


def _fallback(views: Sequence[PagedKV], plan: CopyPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token rows of ``plan`` and their slots, as int64 tensors beside the cache."""
    device = views[0].k.device
    return (torch.tensor(plan.rows, dtype=torch.int64, device=device),
            torch.tensor(plan.slots, dtype=torch.int64, device=device))


def gather(views: Sequence[PagedKV], slots: torch.Tensor, chunk: torch.Tensor) -> None:
    """Copy the KV at ``slots`` (negative = skip: that row is left as it was) of every layer
    into ``chunk`` ``[layers, 2, tokens, H, D]``. ValueError on a shape/dtype mismatch."""
    check_chunk(views, chunk, slots)
    block_size = views[0].block_size
    plan = plan_copy(slots.tolist(), block_size)
    indices = [None if len(g.runs) == 1 else
               torch.tensor(g.blocks, dtype=torch.int64, device=views[0].k.device)
               for g in plan.groups]
    for part, cache in _pairs(views, chunk):
        _gather_pair(plan, indices, block_size, cache, part)
    if plan.rows:
        reference.gather_rows(views, *_fallback(views, plan), chunk)


def scatter(chunk: torch.Tensor, views: Sequence[PagedKV], slots: torch.Tensor) -> None:
    """Copy ``chunk`` ``[layers, 2, tokens, H, D]`` into the KV at ``slots`` (negative = skip)
    of every layer, writing through the views into the engine's blocks; nothing else changes.
    Slots should be distinct (a repeated slot gets one of its rows). ValueError on a mismatch."""
    check_chunk(views, chunk, slots)
    block_size = views[0].block_size
    plan = plan_copy(slots.tolist(), block_size)
    for part, cache in _pairs(views, chunk):
        _scatter_pair(plan, block_size, part, cache)
    if plan.rows:
        reference.scatter_rows(chunk, views, *_fallback(views, plan))
