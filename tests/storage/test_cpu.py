"""CPU tier: budget, LRU order, pins, removal, and the budget under concurrent writers."""

from __future__ import annotations

import threading

import pytest
import torch

from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage import Chunk, CPUTier
from tests.helpers import CHUNK_BYTES, chunk, key, verify_chunk


def tier_for(chunks: int, metrics: EngineMetrics | None = None) -> CPUTier:
    metrics = metrics or EngineMetrics()
    return CPUTier(chunks * CHUNK_BYTES, metrics.for_tier("cpu"))


def test_put_get_round_trip_copies_the_bytes():
    tier = tier_for(4)
    source = chunk(1)
    assert tier.put(key(1), source)
    source.kv.zero_()  # the caller may reuse its tensor once put returns
    with tier.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)
    assert tier.contains(key(1)) and not tier.contains(key(2))
    assert tier.get(key(2)) is None


def test_eviction_is_least_recently_used_first():
    metrics = EngineMetrics()
    tier = tier_for(3, metrics)
    for n in (1, 2, 3):
        tier.put(key(n), chunk(n))
    tier.get(key(1)).release()  # 1 is now the most recent; 2 the least
    tier.put(key(4), chunk(4))
    assert [tier.contains(key(n)) for n in (1, 2, 3, 4)] == [True, False, True, True]
    assert metrics.value("tier_evictions_total", tier="cpu") == 1


def test_touch_keeps_a_prefix_longest():
    """Scenario: a prefix's first chunk outlives its later ones (they are useless without it)."""
    tier = tier_for(3)
    for n in (1, 2, 3):
        tier.put(key(n), chunk(n))
    tier.touch([key(1), key(2), key(3)])
    tier.put(key(4), chunk(4))
    assert tier.contains(key(1)) and not tier.contains(key(3))


def test_budget_is_never_exceeded_and_usage_reports_it():
    tier = tier_for(5)
    for n in range(50):
        assert tier.put(key(n), chunk(n))
    usage = tier.usage()
    assert usage.used_bytes <= usage.capacity_bytes == 5 * CHUNK_BYTES
    assert usage.num_chunks == 5
    assert tier.peak_allocated_bytes <= 5 * CHUNK_BYTES


def test_pinned_chunk_is_not_evicted():
    tier = tier_for(2)
    tier.put(key(1), chunk(1))
    lease = tier.get(key(1))
    for n in range(2, 10):
        tier.put(key(n), chunk(n))
    assert tier.contains(key(1))
    verify_chunk(lease.chunk, 1)
    lease.release()
    tier.put(key(10), chunk(10))
    tier.put(key(11), chunk(11))
    assert not tier.contains(key(1))


def test_put_is_refused_and_counted_when_everything_is_pinned():
    metrics = EngineMetrics()
    tier = tier_for(2, metrics)
    leases = []
    for n in (1, 2):
        tier.put(key(n), chunk(n))
        leases.append(tier.get(key(n)))
    assert not tier.put(key(3), chunk(3))
    assert metrics.value("tier_rejected_total", tier="cpu") == 1
    for lease in leases:
        lease.release()
    assert tier.put(key(3), chunk(3))


def test_remove_while_leased_keeps_the_bytes_until_release():
    tier = tier_for(1)
    tier.put(key(1), chunk(1))
    lease = tier.get(key(1))
    assert tier.remove(key(1)) and not tier.contains(key(1))
    assert not tier.remove(key(1))
    assert not tier.put(key(2), chunk(2))  # the removed chunk's buffer is still leased
    verify_chunk(lease.chunk, 1)
    lease.release()
    lease.release()  # twice is harmless
    assert tier.put(key(2), chunk(2))
    assert tier.usage().used_bytes == CHUNK_BYTES


def test_a_chunk_larger_than_the_budget_is_refused():
    tier = CPUTier(CHUNK_BYTES - 1)
    assert not tier.put(key(1), chunk(1))


def test_budget_under_eight_concurrent_writers_and_readers():
    """Scenario: 8 writers race over 64 keys into room for 6 chunks while readers read."""
    tier = tier_for(6)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        try:
            for i in range(300):
                n = (seed * 7 + i) % 64
                tier.put(key(n), chunk(n))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                for n in range(64):
                    lease = tier.get(key(n))
                    if lease is not None:
                        with lease:
                            verify_chunk(lease.chunk, n)
                assert tier.usage().used_bytes <= 6 * CHUNK_BYTES
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(s,)) for s in range(8)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert not errors, errors[:3]
    assert tier.peak_allocated_bytes <= 6 * CHUNK_BYTES
    assert tier.usage().num_chunks == 6


# ------------------------------------------------------------------ one slab (issue 22, fix 3)

def slab_range(tier: CPUTier) -> range:
    base = tier.slab.data_ptr()
    return range(base, base + tier.slab.nbytes)


def test_the_tier_is_one_slab_of_exactly_the_budget_allocated_at_start():
    tier = tier_for(4)
    assert tier.slab.nbytes == 4 * CHUNK_BYTES and tier.slab.dtype == torch.uint8
    assert tier.usage().used_bytes == 0
    for n in range(12):  # three times what fits: every chunk is a slice of the slab
        assert tier.put(key(n), chunk(n))
        with tier.get(key(n)) as lease:
            kv = lease.chunk.kv
            assert kv.data_ptr() in slab_range(tier)
            assert kv.data_ptr() + kv.nbytes - 1 in slab_range(tier)
        assert tier.usage().used_bytes <= tier.usage().capacity_bytes
    assert tier.peak_allocated_bytes <= 4 * CHUNK_BYTES


def test_eviction_frees_slots_that_later_chunks_reuse():
    tier = tier_for(2)
    for n in (1, 2):
        tier.put(key(n), chunk(n))
    first = {n: tier.get(key(n)) for n in (1, 2)}
    addresses = {lease.chunk.kv.data_ptr() for lease in first.values()}
    for lease in first.values():
        lease.release()
    tier.put(key(3), chunk(3))  # evicts 1, takes its place
    with tier.get(key(3)) as lease:
        assert lease.chunk.kv.data_ptr() in addresses
        verify_chunk(lease.chunk, 3)
    with tier.get(key(2)) as lease:
        verify_chunk(lease.chunk, 2)


def test_chunks_of_different_sizes_share_the_slab_and_free_space_merges_back():
    """Scenario: full chunks and partial ones (a prompt's last chunk) mixed; removing them all
    leaves one free extent: the whole slab, nothing lost to fragments."""
    tier = tier_for(4)
    full = chunk(1)
    half = Chunk(full.kv[:, :, : full.kv.shape[2] // 2].clone())
    assert tier.put(key(1), full) and tier.put(key(2), half) and tier.put(key(3), full)
    assert tier.put(key(4), half) and tier.put(key(5), full)
    assert tier.usage().num_chunks == 5
    for n in (2, 4):
        tier.remove(key(n))
    assert tier.put(key(6), full)  # fits in the room two halves left (evicting if need be)
    for n in range(1, 7):
        tier.remove(key(n))
    assert tier.usage().used_bytes == 0 and tier._pool.free_extents() == 1


@pytest.mark.cuda
def test_on_a_gpu_host_the_slab_is_the_only_pinned_memory_and_exactly_the_budget():
    """torch's pinned allocator would round each chunk up to a power of two and keep it: the
    tier must pin its budget once (registered as it is) and nothing per chunk."""
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    budget = 10 * CHUNK_BYTES + 12345  # not a power of two
    tier = CPUTier(budget)
    assert tier.slab.is_pinned() and tier.slab.nbytes == budget
    device_kv = chunk(1).kv.cuda()
    for n in range(30):
        assert tier.put(key(n), Chunk(device_kv))
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == before
    with tier.get(key(29)) as lease:
        assert torch.equal(lease.chunk.kv.cuda(), device_kv)
    tier.close()
