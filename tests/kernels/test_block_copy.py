"""The CPU block path (``block_copy``) equals the per-token definition (``reference``) bit for bit,
for every layout, dtype, block size and slot-mapping shape, and scatter writes only its slots."""

from __future__ import annotations

import gc
import random
import weakref
from collections.abc import Callable

import pytest
import torch

from lmcache_ext import kernels
from lmcache_ext.kernels import PagedKV, PagedLayout, block_copy, paged_kv, reference
from tests.kernels.test_paged_kernels import PACKED_ORDERS, random_bits

LAYERS, BLOCKS, HEADS, DIM = 3, 10, 2, 8
DTYPES = [torch.bfloat16, torch.float32]
BLOCK_SIZES = [16, 128]


class Cache:
    """A layer set: the buffers that own the bytes, and how vLLM would view them per layer."""

    def __init__(self, name: str, layout: PagedLayout, buffers: list[torch.Tensor],
                 per_layer: Callable[[list[torch.Tensor]], list[torch.Tensor]]):
        self.name, self.layout, self.buffers, self.per_layer = name, layout, buffers, per_layer

    def clone(self) -> Cache:
        return Cache(self.name, self.layout, [b.clone() for b in self.buffers], self.per_layer)

    def views(self) -> list[PagedKV]:
        return [paged_kv(c, self.layout, HEADS, DIM) for c in self.per_layer(self.buffers)]


def all_caches(dtype: torch.dtype, block_size: int, seed: int) -> list[Cache]:
    """Every layout: one buffer for all layers (vLLM >= 0.26, its CPU backend's LBHNC) and one
    tensor per layer (vLLM < 0.26), so both the all-layers and the per-layer paths run."""
    n, shape = block_size, (LAYERS, BLOCKS, HEADS, block_size, 2 * DIM)
    caches = []
    for name, order in PACKED_ORDERS.items():
        physical = random_bits(tuple(shape[i] for i in order), dtype, seed)
        back = [order.index(i) for i in range(5)]
        caches.append(Cache(name, PagedLayout.PACKED, [physical],
                            lambda b, back=back: list(b[0].permute(*back).unbind(0))))
    one = [random_bits(shape, dtype, seed)]
    caches.append(Cache("cpu_blocked LBHNC", PagedLayout.CPU_BLOCKED, one, lambda b: list(b[0])))
    per_layer = [random_bits(shape[1:], dtype, seed + i) for i in range(LAYERS)]
    caches.append(Cache("cpu_blocked per layer", PagedLayout.CPU_BLOCKED, per_layer, list))
    kv_first = [random_bits((2, BLOCKS, n, HEADS, DIM), dtype, seed + i) for i in range(LAYERS)]
    caches.append(Cache("kv_first", PagedLayout.KV_FIRST, kv_first, list))
    hnd = [random_bits((BLOCKS, 2, HEADS, n, DIM), dtype, seed + i) for i in range(LAYERS)]
    caches.append(Cache("block_first HND", PagedLayout.BLOCK_FIRST, hnd,
                        lambda b: [t.transpose(2, 3) for t in b]))
    return caches


def random_slots(block_size: int, seed: int) -> torch.Tensor:
    """Distinct slots in runs: whole blocks (alone and consecutive), partial runs inside a block,
    -1 padding and lone tokens, in random order."""
    rng = random.Random(seed)
    free = list(range(BLOCKS))
    rng.shuffle(free)
    slots: list[int] = []
    while free:
        kind, block = rng.choice(["block", "blocks", "run", "skip", "lone"]), free.pop()
        start = block * block_size
        if kind == "block":
            slots += range(start, start + block_size)
        elif kind == "blocks" and free and free[-1] == block + 1:
            slots += range(start, start + 2 * block_size)
            free.pop()
        elif kind == "run":
            pos = rng.randrange(block_size)
            slots += range(start + pos, start + rng.randint(pos + 1, block_size))
        elif kind == "skip":
            slots += [-1] * rng.randint(1, 3)
        else:
            slots += rng.sample(range(start, start + block_size), rng.randint(1, 5))
    return torch.tensor(slots, dtype=torch.int64)


def named_mappings(block_size: int) -> dict[str, torch.Tensor]:
    n = block_size
    irregular = list(range(3 * n))
    random.Random(n).shuffle(irregular)
    mappings = {f"random {seed}": random_slots(n, seed) for seed in range(4)}
    mappings.update({
        "whole blocks, shuffled": torch.tensor([b * n + p for b in (7, 2, 3, 0) for p in range(n)]),
        "one run from mid-block": torch.arange(n + 3, 4 * n - 2),
        "one run, int32": torch.arange(2 * n, 5 * n, dtype=torch.int32),
        "irregular": torch.tensor(irregular),
        "all skipped": torch.full((5,), -1),
        "empty": torch.zeros(0, dtype=torch.int64),
    })
    return mappings


def verify_same_bytes(want: torch.Tensor, got: torch.Tensor, what: str) -> None:
    width = {2: torch.int16, 4: torch.int32}[want.element_size()]
    assert torch.equal(want.view(width), got.view(width)), what


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_equals_per_token_gather(dtype, block_size):
    for cache in all_caches(dtype, block_size, seed=1):
        for name, slots in named_mappings(block_size).items():
            fill = random_bits((LAYERS, 2, len(slots), HEADS, DIM), dtype, seed=9)
            want, got = fill.clone(), fill.clone()
            reference.gather(cache.views(), slots, want)
            block_copy.gather(cache.views(), slots, got)
            verify_same_bytes(want, got, f"{cache.name}: {name}")


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_equals_per_token_scatter(dtype, block_size):
    for cache in all_caches(dtype, block_size, seed=2):
        for name, slots in named_mappings(block_size).items():
            chunk = random_bits((LAYERS, 2, len(slots), HEADS, DIM), dtype, seed=5)
            want, got = cache.clone(), cache.clone()
            reference.scatter(chunk, want.views(), slots)
            block_copy.scatter(chunk, got.views(), slots)
            for ref, fast in zip(want.buffers, got.buffers, strict=True):
                verify_same_bytes(ref, fast, f"{cache.name}: {name}")


def test_layers_of_one_buffer_move_together_and_others_one_by_one():
    """One [layers, 2, blocks, N, H, D] view when vLLM gives one buffer; per layer otherwise."""
    for cache in all_caches(torch.bfloat16, 16, seed=3):
        chunk = torch.empty((LAYERS, 2, 4, HEADS, DIM), dtype=torch.bfloat16)
        pairs = block_copy._pairs(cache.views(), chunk)
        one_buffer = len(cache.buffers) == 1
        assert len(pairs) == (1 if one_buffer else LAYERS), cache.name
        assert all(p[1].shape[:2] == (LAYERS if one_buffer else 1, 2) for p in pairs)


def test_k_and_v_in_separate_tensors_and_aliased_layers_still_match():
    """Scenario: K and V of a layer in two tensors (no K/V stacking), and all layers one tensor
    (a layer step of 0 would overlap: refused, each layer written in turn as per token)."""
    slots = random_slots(16, seed=7)
    k, v = (random_bits((BLOCKS, 16, HEADS, DIM), torch.float32, s) for s in (1, 2))
    chunk = random_bits((LAYERS, 2, len(slots), HEADS, DIM), torch.float32, seed=3)
    for views in ([PagedKV(k, v)] * LAYERS,
                  [PagedKV(random_bits(k.shape, torch.float32, i), v) for i in range(LAYERS)]):
        assert block_copy._stack([(x.k, x.v) for x in views]) is None
        want, got = chunk.clone(), chunk.clone()
        reference.gather(views, slots, want)
        block_copy.gather(views, slots, got)
        verify_same_bytes(want, got, "gather")
    ref_v, fast_v = v.clone(), v.clone()
    reference.scatter(chunk, [PagedKV(k.clone(), ref_v)] * LAYERS, slots)
    block_copy.scatter(chunk, [PagedKV(k.clone(), fast_v)] * LAYERS, slots)
    verify_same_bytes(ref_v, fast_v, "scatter into aliased layers")


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_a_strided_chunk_buffer(block_size):
    """Scenario: the chunk is a permuted view ([layers, 2, H, tokens, D] storage), as the
    transformers adapter hands out."""
    cache = all_caches(torch.bfloat16, block_size, seed=4)[0]
    for name, slots in named_mappings(block_size).items():
        storage = random_bits((LAYERS, 2, HEADS, len(slots), DIM), torch.bfloat16, seed=6)
        want, got = storage.clone(), storage.clone()
        reference.gather(cache.views(), slots, want.transpose(2, 3))
        block_copy.gather(cache.views(), slots, got.transpose(2, 3))
        verify_same_bytes(want, got, f"gather {name}")
        ref, fast = cache.clone(), cache.clone()
        reference.scatter(storage.transpose(2, 3), ref.views(), slots)
        block_copy.scatter(storage.transpose(2, 3), fast.views(), slots)
        verify_same_bytes(ref.buffers[0], fast.buffers[0], f"scatter {name}")


def test_cpu_tensors_take_the_block_path():
    cache = all_caches(torch.bfloat16, 16, seed=8)[0]
    slots = torch.arange(16, 80)
    want = torch.zeros((LAYERS, 2, len(slots), HEADS, DIM), dtype=torch.bfloat16)
    got = want.clone()
    reference.gather(cache.views(), slots, want)
    kernels.gather(cache.views(), slots, got)
    verify_same_bytes(want, got, "kernels.gather")
    with pytest.raises(ValueError, match="chunk must be"):
        kernels.scatter(got[:, :, :3], cache.views(), slots)


def test_layer_stacking_is_checked_once_per_layer_set_and_never_keeps_a_cache_alive():
    """Scenario: the connector loads chunk after chunk through one set of views; later the
    engine drops its cache."""
    cache = all_caches(torch.bfloat16, 16, seed=9)[0]
    views = cache.views()
    first = block_copy._MEMO.get(views)
    assert block_copy._MEMO.get(views) is first  # same PagedKV objects: no second check
    assert block_copy._MEMO.get(list(views)) is first  # a new list of the same views too
    other = all_caches(torch.bfloat16, 16, seed=9)[-1]  # per-layer tensors: other stacks
    assert block_copy._MEMO.get(other.views()) != first
    block_copy.gather(views, torch.arange(32), torch.empty((LAYERS, 2, 32, HEADS, DIM),
                                                           dtype=torch.bfloat16))
    buffer = weakref.ref(cache.buffers[0])
    del cache, views
    gc.collect()
    assert buffer() is None
