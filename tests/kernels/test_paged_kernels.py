"""Gather/scatter by slot mapping: the Triton kernel (under TRITON_INTERPRET=1) equals the torch
reference bit for bit, for every supported layout, dtype and slot-mapping shape."""

from __future__ import annotations

import os

import pytest
import torch

# TRITON_INTERPRET=1 is set by tests/kernels/__init__.py before this import; checked below.
from lmcache_ext.kernels import PagedLayout, UnsupportedLayout, paged_kv, reference, triton_paged

LAYERS, BLOCKS, HEADS, BLOCK_SIZE, DIM = 3, 6, 2, 4, 8
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Physical orders of vLLM >= 0.26's flat buffer, as permutations of [L, B, H, N, C].
PACKED_ORDERS = {"LBNHC": (0, 1, 3, 2, 4), "LBHNC": (0, 1, 2, 3, 4), "BLNHC": (1, 0, 3, 2, 4),
                 "BHLNC": (1, 2, 0, 3, 4)}


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns (NaN payloads included): a copy that rounds anything shows."""
    generator = torch.Generator().manual_seed(seed)
    width = {2: torch.int16, 4: torch.int32}[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(width)
    raw = torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64)
    return raw.to(width).view(dtype)


def packed_caches(order: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Per-layer [B, H, N, 2D] views over one flat buffer in physical ``order``, like vLLM's."""
    logical = (LAYERS, BLOCKS, HEADS, BLOCK_SIZE, 2 * DIM)
    physical = random_bits(tuple(logical[i] for i in order), dtype, seed)
    view = physical.permute(*[order.index(i) for i in range(5)])  # back to logical axes
    assert tuple(view.shape) == logical
    return [view[layer] for layer in range(LAYERS)]


def legacy_caches(layout: PagedLayout, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """vLLM < 0.26 per-layer tensors; the block-first one with HND strides (non-contiguous)."""
    if layout is PagedLayout.CPU_BLOCKED:
        return [random_bits((BLOCKS, HEADS, BLOCK_SIZE, 2 * DIM), dtype, seed + i)
                for i in range(LAYERS)]
    if layout is PagedLayout.KV_FIRST:
        return [random_bits((2, BLOCKS, BLOCK_SIZE, HEADS, DIM), dtype, seed + i)
                for i in range(LAYERS)]
    hnd = [random_bits((BLOCKS, 2, HEADS, BLOCK_SIZE, DIM), dtype, seed + i)
           for i in range(LAYERS)]
    return [t.transpose(2, 3) for t in hnd]


def all_caches(dtype: torch.dtype, seed: int):
    for name, order in PACKED_ORDERS.items():
        yield name, PagedLayout.PACKED, packed_caches(order, dtype, seed)
    for layout in (PagedLayout.CPU_BLOCKED, PagedLayout.KV_FIRST, PagedLayout.BLOCK_FIRST):
        yield layout.value, layout, legacy_caches(layout, dtype, seed)


def views_of(caches, layout):
    return [paged_kv(c, layout, HEADS, DIM) for c in caches]


# Odd order across blocks, a partial last block, repeated blocks, skipped (-1) slots.
SLOTS = torch.tensor([13, 0, -1, 22, 5, 6, 7, 23, -1, 1, 17], dtype=torch.int64)


def test_the_triton_kernel_runs_in_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert type(triton_paged._copy_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_triton_equals_reference_bit_exactly(dtype):
    for name, layout, caches in all_caches(dtype, seed=1):
        views = views_of(caches, layout)
        fill = random_bits((LAYERS, 2, len(SLOTS), HEADS, DIM), dtype, seed=9)
        want, got = fill.clone(), fill.clone()
        reference.gather(views, SLOTS, want)
        triton_paged.gather(views, SLOTS, got)
        assert torch.equal(want.view(torch.uint8), got.view(torch.uint8)), name
        # Skipped slots leave their chunk rows as they were.
        assert torch.equal(want[:, :, 2].view(torch.uint8), fill[:, :, 2].view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_triton_equals_reference_and_touches_only_its_slots(dtype):
    chunk = random_bits((LAYERS, 2, len(SLOTS), HEADS, DIM), dtype, seed=5)
    for name, layout, ref_caches in all_caches(dtype, seed=2):
        tri_caches = [c.clone() for c in ref_caches]  # same bytes, contiguous
        before = [c.clone() for c in ref_caches]
        reference.scatter(chunk, views_of(ref_caches, layout), SLOTS)
        triton_paged.scatter(chunk, views_of(tri_caches, layout), SLOTS)
        for ref, tri in zip(ref_caches, tri_caches, strict=True):
            assert torch.equal(ref.view(torch.uint8), tri.view(torch.uint8)), name
        verify_only_slots_changed(before, ref_caches, layout, name)


def verify_only_slots_changed(before, after, layout, name):
    changed = set()
    for old, new in zip(before, after, strict=True):
        old_v, new_v = paged_kv(old, layout, HEADS, DIM), paged_kv(new, layout, HEADS, DIM)
        for part in ("k", "v"):
            diff = getattr(old_v, part).view(torch.uint8) != getattr(new_v, part).view(
                torch.uint8)
            rows = diff.flatten(2).any(-1).nonzero()
            changed |= {int(b) * BLOCK_SIZE + int(n) for b, n in rows}
    assert changed <= {int(s) for s in SLOTS if s >= 0}, name


@pytest.mark.parametrize("layout_name", ["LBNHC", "BLNHC"])
def test_gather_then_scatter_into_fresh_blocks_round_trips(layout_name):
    order = PACKED_ORDERS[layout_name]
    source = packed_caches(order, torch.bfloat16, seed=3)
    dest = [torch.zeros_like(c) for c in packed_caches(order, torch.bfloat16, seed=4)]
    src_slots = torch.tensor([4, 5, 6, 7, 20, 21])  # blocks 1 and 5 (the last one partial)
    dst_slots = torch.tensor([8, 9, 10, 11, 0, 1])  # into blocks 2 and 0
    chunk = torch.empty((LAYERS, 2, 6, HEADS, DIM), dtype=torch.bfloat16)
    triton_paged.gather(views_of(source, PagedLayout.PACKED), src_slots, chunk)
    triton_paged.scatter(chunk, views_of(dest, PagedLayout.PACKED), dst_slots)
    for src, dst in zip(source, dest, strict=True):
        assert torch.equal(src[1].view(torch.int16), dst[2].view(torch.int16))
        assert torch.equal(src[5, :, :2].view(torch.int16), dst[0, :, :2].view(torch.int16))


def test_layers_in_separate_storages_use_one_launch_each():
    caches = legacy_caches(PagedLayout.KV_FIRST, torch.float16, seed=6)
    assert triton_paged._layer_stride(views_of(caches, PagedLayout.KV_FIRST), "k") is None
    want = torch.zeros((LAYERS, 2, len(SLOTS), HEADS, DIM), dtype=torch.float16)
    got = want.clone()
    reference.gather(views_of(caches, PagedLayout.KV_FIRST), SLOTS, want)
    triton_paged.gather(views_of(caches, PagedLayout.KV_FIRST), SLOTS, got)
    assert torch.equal(want.view(torch.int16), got.view(torch.int16))


def test_unsupported_layouts_and_bad_chunks_are_clear_errors():
    mla = torch.zeros(BLOCKS, BLOCK_SIZE, 576)  # MLA: one latent per token
    with pytest.raises(UnsupportedLayout, match="MLA"):
        paged_kv(mla, PagedLayout.PACKED, 1, 288)
    with pytest.raises(UnsupportedLayout, match="kv_first"):
        paged_kv(torch.zeros(BLOCKS, 2, BLOCK_SIZE, HEADS, DIM), PagedLayout.KV_FIRST,
                 HEADS, DIM)
    views = views_of(packed_caches(PACKED_ORDERS["LBNHC"], torch.float16, 0), PagedLayout.PACKED)
    with pytest.raises(ValueError, match="chunk must be"):
        reference.gather(views, SLOTS, torch.zeros((LAYERS, 2, 3, HEADS, DIM)))
    with pytest.raises(ValueError, match="past the cache"):
        reference.gather(views, torch.tensor([BLOCKS * BLOCK_SIZE]),
                         torch.zeros((LAYERS, 2, 1, HEADS, DIM), dtype=torch.float16))
