"""The compiled Triton kernels on a real GPU (``cuda``-marked: run by scripts/gpu_check.sh with
TRITON_INTERPRET=0, deselected by make test, failing without a GPU): bit-exact against the torch
reference on vLLM 0.23's per-layer and 0.33's packed caches in bf16 and fp8, one launch per
chunk, no host-device sync on the copy path, and ordered by streams and events."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext import kernels
from lmcache_ext.kernels import PagedLayout, paged_kv_layers, reference, triton_paged
from tests.kernels.test_paged_kernels import PACKED_ORDERS, LaunchCounter

pytestmark = pytest.mark.cuda

LAYERS, BLOCKS, HEADS, BLOCK_SIZE, DIM = 4, 40, 4, 16, 128  # a 7B rank's head shape
TOKENS = 256
DTYPES = [torch.bfloat16, torch.float8_e4m3fn]
_INT = {1: torch.uint8, 2: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.element_size()])


def random_cache(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns of ``dtype`` on the GPU (NaN payloads included)."""
    generator = torch.Generator().manual_seed(seed)
    width = _INT[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(width)
    raw = torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64)
    return raw.to(width).view(dtype).cuda()


def vllm_caches(name: str, dtype: torch.dtype, seed: int) -> tuple[list[torch.Tensor],
                                                                     PagedLayout]:
    """vLLM 0.23: a [B, 2, N, H, D] tensor per layer (NHD, or HND strides); vLLM 0.33: per-layer
    [B, H, N, 2D] views of one buffer in a KVCacheLayout order."""
    if name == "0.23-nhd":
        return [random_cache((BLOCKS, 2, BLOCK_SIZE, HEADS, DIM), dtype, seed + i)
                for i in range(LAYERS)], PagedLayout.BLOCK_FIRST
    if name == "0.23-hnd":
        return [random_cache((BLOCKS, 2, HEADS, BLOCK_SIZE, DIM), dtype, seed + i).transpose(2, 3)
                for i in range(LAYERS)], PagedLayout.BLOCK_FIRST
    order = PACKED_ORDERS[name.removeprefix("0.33-")]
    logical = (LAYERS, BLOCKS, HEADS, BLOCK_SIZE, 2 * DIM)
    physical = random_cache(tuple(logical[i] for i in order), dtype, seed)
    view = physical.permute(*[order.index(i) for i in range(5)])
    return list(view.unbind(0)), PagedLayout.PACKED


LAYOUTS = ["0.23-nhd", "0.23-hnd", "0.33-LBNHC", "0.33-LBHNC", "0.33-BLNHC"]


def host_slots() -> torch.Tensor:
    """A chunk over shuffled blocks, a skipped (-1) slot, pinned (as the worker keeps them)."""
    order = torch.randperm(BLOCKS, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(TOKENS)
    slots = order[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    slots[7] = -1
    return slots.pin_memory()


def cpu_views(caches: list[torch.Tensor], layout: PagedLayout):
    return paged_kv_layers([bits(c).cpu() for c in caches], layout, HEADS, DIM)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", LAYOUTS)
def test_compiled_kernels_equal_the_reference_in_one_launch(name, dtype, monkeypatch):
    counter = LaunchCounter(triton_paged._copy_kernel)
    monkeypatch.setattr(triton_paged, "_copy_kernel", counter)
    caches, layout = vllm_caches(name, dtype, seed=1)
    views = paged_kv_layers(caches, layout, HEADS, DIM)
    slots = host_slots()
    want = bits(random_cache((LAYERS, 2, TOKENS, HEADS, DIM), dtype, seed=2)).cpu()
    got = want.view(dtype).cuda()
    reference.gather(cpu_views(caches, layout), slots, want)
    kernels.gather(views, slots.cuda(), got, host_slots=slots)
    assert counter.launches == 1
    assert torch.equal(bits(got).cpu(), want)
    chunk = random_cache((LAYERS, 2, TOKENS, HEADS, DIM), dtype, seed=4)
    expected = cpu_views(caches, layout)
    reference.scatter(bits(chunk).cpu(), expected, slots)
    kernels.scatter(chunk, views, slots.cuda(), host_slots=slots)
    assert counter.launches == 2
    for ours, theirs in zip(cpu_views(caches, layout), expected, strict=True):
        assert torch.equal(ours.k, theirs.k) and torch.equal(ours.v, theirs.v)


def test_the_copy_path_never_syncs_with_the_device():
    """Scenario: device slots with their pinned host copy. torch's sync debug mode turns any
    synchronizing call (a read-back of a CUDA tensor, a blocking copy) into an error."""
    caches, layout = vllm_caches("0.23-nhd", torch.bfloat16, seed=5)
    views = paged_kv_layers(caches, layout, HEADS, DIM)
    kernels.prepare(views)  # the tables' one host-to-device copy, at register time
    slots = host_slots()
    device_slots = slots.cuda()
    chunk = torch.empty((LAYERS, 2, TOKENS, HEADS, DIM), dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.gather(views, device_slots, chunk, host_slots=slots)
        kernels.scatter(chunk, views, device_slots, host_slots=slots)
        kernels.gather(views, slots, chunk)  # pinned host slots: copied without a sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match="past the cache"):
        bad = torch.tensor([BLOCKS * BLOCK_SIZE] * TOKENS)
        kernels.gather(views, bad.cuda(), chunk, host_slots=bad)


def test_a_load_on_its_own_stream_is_ordered_by_events():
    """Scenario: the worker's load stream. The scatter waits for an event recorded after the
    compute stream last wrote the chunk; the compute stream waits for the scatter's event
    before reading the cache. Both orders hold, so the cache ends with the chunk's bytes."""
    caches, layout = vllm_caches("0.33-LBNHC", torch.bfloat16, seed=6)
    views = paged_kv_layers(caches, layout, HEADS, DIM)
    slots = host_slots()
    device_slots = slots.cuda()
    chunk = torch.zeros((LAYERS, 2, TOKENS, HEADS, DIM), dtype=torch.bfloat16, device="cuda")
    source = random_cache(tuple(chunk.shape), torch.bfloat16, seed=7)
    load_stream = torch.cuda.Stream()
    torch.cuda._sleep(50_000_000)  # keep the compute stream busy: a missing wait shows
    chunk.copy_(source)
    written = torch.cuda.Event()
    written.record()
    with torch.cuda.stream(load_stream):
        load_stream.wait_event(written)
        kernels.scatter(chunk, views, device_slots, host_slots=slots)
        loaded = torch.cuda.Event()
        loaded.record(load_stream)
    torch.cuda.current_stream().wait_event(loaded)
    back = torch.zeros_like(chunk)
    kernels.gather(views, device_slots, back, host_slots=slots)
    keep = slots >= 0
    assert torch.equal(bits(back)[:, :, keep.cuda()], bits(source)[:, :, keep.cuda()])


def test_a_70b_rank_chunk_round_trips_across_80_separately_allocated_layers():
    """Scenario: vLLM 0.23 on a 70B model at TP 1: 80 per-layer caches, 8 KV heads, one
    256-token chunk: one launch each way, bytes back where they were."""
    layers, heads = 80, 8
    caches = [random_cache((BLOCKS, 2, BLOCK_SIZE, heads, DIM), torch.bfloat16, seed=i)
              for i in range(layers)]
    views = paged_kv_layers(caches, PagedLayout.BLOCK_FIRST, heads, DIM)
    slots = host_slots()
    chunk = torch.empty((layers, 2, TOKENS, heads, DIM), dtype=torch.bfloat16, device="cuda")
    kernels.gather(views, slots.cuda(), chunk, host_slots=slots)
    before = [bits(c).clone() for c in caches]
    for cache in caches:
        cache.zero_()
    kernels.scatter(chunk, views, slots.cuda(), host_slots=slots)
    for old, cache in zip(before, caches, strict=True):
        mask = torch.zeros(BLOCKS * BLOCK_SIZE, dtype=torch.bool)
        mask[slots[slots >= 0]] = True
        mask = mask.view(BLOCKS, BLOCK_SIZE).cuda()
        for kv in (0, 1):
            assert torch.equal(bits(cache)[:, kv][mask], old[:, kv][mask])
