"""Tiered store: write-behind, drops, promotion, prefixes across tiers, a failing tier."""

from __future__ import annotations

import threading

from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage import Chunk, CPUTier, TieredStore
from tests.helpers import CHUNK_BYTES, chunk, key, verify_chunk


class GatedTier(CPUTier):
    """A real CPU tier whose puts wait for a gate: a slower tier whose speed the test controls."""

    name = "slow"

    def __init__(self, chunks: int, metrics: EngineMetrics):
        super().__init__(chunks * CHUNK_BYTES, metrics.for_tier(self.name))
        self.gate = threading.Event()
        self.gate.set()

    def put(self, key, chunk: Chunk) -> bool:
        assert self.gate.wait(timeout=30)
        return super().put(key, chunk)


class BrokenTier(CPUTier):
    name = "broken"

    def put(self, key, chunk):
        raise OSError("disk on fire")


def make(cpu_chunks: int, slow_chunks: int, queue: int = 64):
    metrics = EngineMetrics()
    cpu = CPUTier(cpu_chunks * CHUNK_BYTES, metrics.for_tier("cpu"))
    slow = GatedTier(slow_chunks, metrics)
    return TieredStore([cpu, slow], metrics, queue), cpu, slow, metrics


def test_store_reaches_the_slower_tier_behind_the_caller():
    store, cpu, slow, _ = make(4, 4)
    slow.gate.clear()
    assert store.put(key(1), chunk(1))
    assert cpu.contains(key(1)) and not slow.contains(key(1))  # the caller did not wait
    slow.gate.set()
    store.flush()
    with slow.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)
    store.close()


def test_cpu_smaller_than_working_set_loses_nothing_the_slow_tier_has_room_for():
    """Scenario: 3 chunks of RAM, 40 chunks stored, a slow tier with room for all 40."""
    store, cpu, slow, metrics = make(3, 40)
    for n in range(40):
        assert store.put(key(n), chunk(n))
    store.flush()
    assert all(slow.contains(key(n)) for n in range(40))
    assert metrics.value("tier_dropped_total", tier="slow") == 0
    for n in range(40):
        with store.get(key(n)) as lease:
            verify_chunk(lease.chunk, n)
    store.close()


def test_full_write_behind_queue_drops_and_counts_instead_of_blocking():
    store, cpu, slow, metrics = make(64, 64, queue=2)
    slow.gate.clear()  # the slow tier stalls: 2 workers hold one item each, 2 wait in the queue
    for n in range(20):
        assert store.put(key(n), chunk(n))  # never blocks
    dropped = metrics.value("tier_dropped_total", tier="slow")
    assert 16 <= dropped <= 18
    slow.gate.set()
    store.flush()
    assert slow.usage().num_chunks == 20 - dropped
    assert all(cpu.contains(key(n)) for n in range(20))  # dropped only for the slow tier
    store.close()


def test_hit_in_slower_tier_is_promoted():
    store, cpu, slow, metrics = make(4, 4)
    slow.put(key(7), chunk(7))
    with store.get(key(7)) as lease:
        verify_chunk(lease.chunk, 7)
    assert cpu.contains(key(7))
    assert metrics.value("tier_promoted_total", tier="slow") == 1
    assert metrics.value("tier_hits_total", tier="slow") == 1
    with store.get(key(7)):
        pass
    assert metrics.value("tier_hits_total", tier="cpu") == 1
    store.close()


def test_prefix_spans_tiers_that_alternate():
    store, cpu, slow, _ = make(8, 8)
    cpu.put(key(0), chunk(0))
    slow.put(key(1), chunk(1))
    cpu.put(key(2), chunk(2))
    slow.put(key(4), chunk(4))
    assert store.prefix_length([key(n) for n in range(5)]) == 3
    assert store.prefix_length([key(9), key(0)]) == 0
    store.close()


def test_a_tier_that_raises_is_counted_and_never_reaches_the_caller():
    metrics = EngineMetrics()
    cpu = CPUTier(4 * CHUNK_BYTES, metrics.for_tier("cpu"))
    store = TieredStore([cpu, BrokenTier(4 * CHUNK_BYTES)], metrics)
    assert store.put(key(1), chunk(1))
    store.flush()
    assert metrics.value("tier_errors_total", tier="broken") == 1
    with store.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)
    store.close()


def test_a_flush_with_a_time_limit_returns_what_is_left_and_a_discarding_close_drops_it():
    """Scenario: a drain's deadline while the slower tier stalls; the exit must not wait."""
    store, cpu, slow, metrics = make(16, 16, queue=8)
    slow.gate.clear()  # 2 workers hold one chunk each, 4 more wait in the queue
    for n in range(6):
        assert store.put(key(n), chunk(n))
    assert store.flush_tier("slow", timeout_s=0.2) == 6
    assert store.flush_tier("nowhere", timeout_s=0.2) == 0
    releaser = threading.Timer(0.3, slow.gate.set)  # the two writes in progress end later
    releaser.start()
    store.close(discard_queued=True)
    releaser.join()
    assert metrics.value("tier_dropped_total", tier="slow") == 4
    assert slow.usage().num_chunks == 2  # the two in progress, nothing of the dropped ones


def test_a_flush_with_a_time_limit_returns_zero_once_everything_is_written():
    store, _, slow, _ = make(16, 16)
    for n in range(6):
        assert store.put(key(n), chunk(n))
    assert store.flush_tier("slow", timeout_s=10) == 0
    assert slow.usage().num_chunks == 6
    store.close()
