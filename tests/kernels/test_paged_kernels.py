"""Gather/scatter by slot mapping: the Triton kernel (under TRITON_INTERPRET=1) equals the torch
reference bit for bit, for every supported layout, dtype and slot-mapping shape."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# TRITON_INTERPRET=1 is set by tests/kernels/__init__.py before this import; checked below.
from lmcache_ext.kernels import PagedLayout, UnsupportedLayout, paged_kv, reference, triton_paged
from lmcache_ext.kernels.layouts import check_chunk

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


class LaunchCounter:
    """Stands in the module for the kernel and counts its launches; each launch runs the real
    kernel (a spy, not a mock)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch) -> LaunchCounter:
    counter = LaunchCounter(triton_paged._copy_kernel)
    monkeypatch.setattr(triton_paged, "_copy_kernel", counter)
    return counter


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_one_launch_per_chunk_for_all_layers_on_every_layout(dtype, launches):
    """Scenario: vLLM 0.23 hands one separately allocated tensor per layer (block_first, kv_first,
    cpu_blocked here); vLLM 0.33 per-layer views of one buffer (packed, every physical order).
    Either way a chunk is one launch, through the per-layer pointer table, and bit-exact."""
    for name, layout, caches in all_caches(dtype, seed=11):
        views = views_of(caches, layout)
        want = torch.zeros((LAYERS, 2, len(SLOTS), HEADS, DIM), dtype=dtype)
        got = want.clone()
        reference.gather(views, SLOTS, want)
        before = launches.launches
        triton_paged.gather(views, SLOTS, got)
        assert launches.launches - before == 1, name
        assert torch.equal(want.view(torch.uint8), got.view(torch.uint8)), name
        triton_paged.scatter(got, views, SLOTS)
        assert launches.launches - before == 2, name


def test_layers_with_different_strides_get_one_launch_per_stride_group(launches):
    """Scenario: layers 0-1 NHD and layer 2 HND (no vLLM does this, but nothing forbids it): two
    stride groups, two launches, still bit-exact."""
    caches = legacy_caches(PagedLayout.BLOCK_FIRST, torch.float16, seed=6)  # HND strides
    caches[:2] = [c.contiguous() for c in caches[:2]]  # NHD strides
    views = views_of(caches, PagedLayout.BLOCK_FIRST)
    want = torch.zeros((LAYERS, 2, len(SLOTS), HEADS, DIM), dtype=torch.float16)
    got = want.clone()
    reference.gather(views, SLOTS, want)
    triton_paged.gather(views, SLOTS, got)
    assert launches.launches == 1 + 1
    assert torch.equal(want.view(torch.int16), got.view(torch.int16))


def test_the_pointer_tables_are_built_once_per_layer_set():
    caches = legacy_caches(PagedLayout.KV_FIRST, torch.bfloat16, seed=7)
    views = views_of(caches, PagedLayout.KV_FIRST)
    tables = triton_paged.prepare(views)
    chunk = torch.zeros((LAYERS, 2, len(SLOTS), HEADS, DIM), dtype=torch.bfloat16)
    triton_paged.gather(views, SLOTS, chunk)
    assert triton_paged.prepare(views) is tables
    assert tables.groups[0].k_table.tolist() == [v.k.data_ptr() for v in views]
    assert triton_paged.prepare(views_of(caches, PagedLayout.KV_FIRST)) is not tables


def test_fp8_caches_copy_bit_exactly():
    """Scenario: an fp8 (e4m3) KV cache. torch's CPU reference has no fp8 index_copy, so the
    reference runs on the same bytes viewed as uint8; the kernel runs on the fp8 tensors."""
    caches = [random_bits((BLOCKS, 2, BLOCK_SIZE, HEADS, DIM // 2), torch.int16, seed=i)
              .view(torch.float8_e4m3fn) for i in range(LAYERS)]  # [B, 2, N, H, D]
    chunk = random_bits((LAYERS, 2, len(SLOTS), HEADS, DIM // 2), torch.int16, seed=8).view(
        torch.float8_e4m3fn)
    want, got = chunk.view(torch.uint8).clone(), chunk.clone()
    reference.gather(views_of([c.view(torch.uint8) for c in caches], PagedLayout.BLOCK_FIRST),
                     SLOTS, want)
    triton_paged.gather(views_of(caches, PagedLayout.BLOCK_FIRST), SLOTS, got)
    assert torch.equal(want, got.view(torch.uint8))
    dest = [torch.zeros_like(c) for c in caches]
    triton_paged.scatter(got, views_of(dest, PagedLayout.BLOCK_FIRST), SLOTS)
    for src, dst in zip(caches, dest, strict=True):
        for slot in (int(s) for s in SLOTS if s >= 0):
            block, pos = divmod(slot, BLOCK_SIZE)
            assert torch.equal(src[block, :, pos].view(torch.uint8),
                               dst[block, :, pos].view(torch.uint8))


def test_bounds_are_checked_on_the_host_copy_and_unchecked_device_slots_stay_inside():
    """Scenario: a slot past the cache. With a host copy (CPU slots, or ``host_slots`` beside
    device slots) it is a ValueError before any launch; slots nobody checked are skipped by the
    kernel, which reads and writes nothing outside the views."""
    caches = legacy_caches(PagedLayout.KV_FIRST, torch.float16, seed=3)
    views = views_of(caches, PagedLayout.KV_FIRST)
    past = torch.tensor([1, BLOCKS * BLOCK_SIZE])
    chunk = torch.zeros((LAYERS, 2, 2, HEADS, DIM), dtype=torch.float16)
    with pytest.raises(ValueError, match="past the cache"):
        triton_paged.scatter(chunk, views, past)
    # "meta": a device tensor whose values cannot be read (as a CUDA one cannot without a sync).
    with pytest.raises(ValueError, match="past the cache"):
        check_chunk(views, chunk, past.to("meta"), host_slots=past)
    with pytest.raises(ValueError, match="host copy"):
        check_chunk(views, chunk, past.to("meta"), host_slots=past[:1])
    before = [c.clone() for c in caches]
    chunk = random_bits((LAYERS, 2, 2, HEADS, DIM), torch.float16, seed=4)
    triton_paged._run(views, chunk, past, to_chunk=False)  # what unchecked device slots get
    for old, new in zip(before, caches, strict=True):
        changed = (old.view(torch.int16) != new.view(torch.int16)).nonzero()
        assert {int(b) * BLOCK_SIZE + int(n) for _, b, n, _, _ in changed} == {1}


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


def test_index_products_past_int32_address_the_right_elements(tmp_path):
    """Scenario: a head stride of 2**30 elements, so head 2 starts 2**31 elements in: ``h * kh``
    overflows int32 there (each factor fits: Triton passes both as int32) and only int64 index
    arithmetic reaches it. The cache is a 6 GiB sparse file mapped copy-on-write: only the pages
    touched take memory. In a child process: int32 arithmetic addresses memory before the
    buffer, and the crash it causes fails this test instead of ending the session."""
    code = ("import sys; from tests.kernels.test_paged_kernels import check_past_int32; "
            "check_past_int32(sys.argv[1]); print('bit-exact')")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (os.getcwd(),
                                                       os.environ.get("PYTHONPATH"))))}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sparse.bin")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "bit-exact" in done.stdout, done.stderr[-2000:]


def check_past_int32(path: str) -> None:
    """Gather and scatter through a 6 GiB-strided view equal the reference (asserts)."""
    head_step, heads, blocks, size, dim = 2 ** 30, 4, 2, 2, 8
    elements = (heads - 1) * head_step + blocks * 2 * size * dim
    with open(path, "wb") as f:
        f.truncate(elements * 2)
    storage = torch.from_file(path, shared=False, size=elements, dtype=torch.int16)
    # [B, 2, N, H, D], D contiguous, heads 2 GiB apart.
    cache = storage.as_strided((blocks, 2, size, heads, dim),
                               (2 * size * dim, size * dim, dim, head_step, 1)).view(torch.bfloat16)
    cache.copy_(random_bits(tuple(cache.shape), torch.bfloat16, seed=12))
    views = [paged_kv(cache, PagedLayout.BLOCK_FIRST, heads, dim)]
    slots = torch.tensor([3, 0, 2, 1])
    want = torch.zeros((1, 2, 4, heads, dim), dtype=torch.bfloat16)
    got = want.clone()
    reference.gather(views, slots, want)
    triton_paged.gather(views, slots, got)
    assert torch.equal(want.view(torch.int16), got.view(torch.int16))
    chunk = random_bits((1, 2, 4, heads, dim), torch.bfloat16, seed=13)
    triton_paged.scatter(chunk, views, slots)
    back = torch.zeros_like(chunk)
    reference.gather(views, slots, back)
    assert torch.equal(back.view(torch.int16), chunk.view(torch.int16))
