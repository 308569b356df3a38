"""Disk tier: round trips, namespaces, budget and LRU, restart recovery, O_DIRECT, concurrency,
parallel reads, and the seed's NVMe config end to end."""

from __future__ import annotations

import os
import random
import threading
from contextlib import closing

import pytest
import torch

from lmcache_ext.chunk import HEADER_SIZE, KVLayout
from lmcache_ext.config import ConfigError, load_config
from lmcache_ext.engine import CacheEngine
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage import CPUTier, DiskTier, TieredStore, build_tiers
from lmcache_ext.storage.direct_io import ALIGN, AlignedBuffer, padded, probe_odirect
from tests.helpers import CHUNK_BYTES, SEED_NVME, chunk, key, verify_chunk

NAMESPACE = key(0).namespace
FILE_BYTES = padded(HEADER_SIZE + CHUNK_BYTES)  # one helper chunk on disk (4096)


def disk_for(directory, chunks: int, metrics: EngineMetrics | None = None,
             odirect: bool = True, namespace: str = NAMESPACE) -> DiskTier:
    metrics = metrics or EngineMetrics()
    return DiskTier(str(directory), chunks * FILE_BYTES, namespace, odirect,
                    metrics.for_tier("disk"))


def files_in(tier: DiskTier) -> list[str]:
    return sorted(os.listdir(tier.directory))


def test_put_get_round_trip_through_a_file_named_by_the_key(tmp_path):
    tier = disk_for(tmp_path, 4)
    source = chunk(1)
    assert tier.put(key(1), source)
    source.kv.zero_()  # the caller may reuse its tensor once put returns
    assert files_in(tier) == [key(1).digest.hex()]
    assert os.path.getsize(os.path.join(tier.directory, key(1).digest.hex())) == FILE_BYTES
    with tier.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)
    assert tier.contains(key(1)) and not tier.contains(key(2))
    assert tier.get(key(2)) is None
    assert tier.usage().used_bytes == FILE_BYTES


def test_a_strided_slice_is_stored_as_its_values(tmp_path):
    tier = disk_for(tmp_path, 4)
    wide = torch.randn(2, 2, 32, 2, 8).to(torch.float16)
    assert tier.put(key(1), type(chunk(1))(wide[:, :, 16:32]))
    with tier.get(key(1)) as lease:
        assert torch.equal(lease.chunk.kv, wide[:, :, 16:32])


def test_keys_of_another_namespace_are_never_served(tmp_path):
    """Scenario: two models share one cache directory; neither sees the other's chunks."""
    mine = disk_for(tmp_path, 4)
    theirs = disk_for(tmp_path, 4, namespace="other00000000000")
    assert mine.put(key(1), chunk(1))
    assert theirs.get(key(1, "other00000000000")) is None
    assert not theirs.contains(key(1, "other00000000000"))
    assert not mine.put(key(2, "other00000000000"), chunk(2))  # a foreign key is refused
    assert mine.directory != theirs.directory


def test_budget_counts_padded_files_and_evicts_least_recent_first(tmp_path):
    metrics = EngineMetrics()
    tier = disk_for(tmp_path, 3, metrics)
    for n in (1, 2, 3):
        assert tier.put(key(n), chunk(n))
    tier.get(key(1)).release()  # 1 is now the most recent; 2 the least
    assert tier.put(key(4), chunk(4))
    assert [tier.contains(key(n)) for n in (1, 2, 3, 4)] == [True, False, True, True]
    assert len(files_in(tier)) == 3
    assert tier.usage().used_bytes == 3 * FILE_BYTES == tier.peak_used_bytes
    assert metrics.value("tier_evictions_total", tier="disk") == 1


def test_a_chunk_larger_than_the_budget_is_rejected(tmp_path):
    metrics = EngineMetrics()
    tier = DiskTier(str(tmp_path), FILE_BYTES - 1, NAMESPACE, True, metrics.for_tier("disk"))
    assert not tier.put(key(1), chunk(1))
    assert metrics.value("tier_rejected_total", tier="disk") == 1
    assert files_in(tier) == []


def test_remove_deletes_the_file_and_gives_its_bytes_back(tmp_path):
    tier = disk_for(tmp_path, 2)
    tier.put(key(1), chunk(1))
    assert tier.remove(key(1)) and not tier.remove(key(1))
    assert files_in(tier) == [] and tier.usage().used_bytes == 0


def test_a_reader_keeps_its_chunk_when_the_file_is_evicted_meanwhile(tmp_path):
    """Scenario: a chunk is evicted while a lease on it is held; the lease's bytes stay valid."""
    tier = disk_for(tmp_path, 1)
    tier.put(key(1), chunk(1))
    lease = tier.get(key(1))
    assert tier.put(key(2), chunk(2))  # evicts 1
    assert not tier.contains(key(1))
    verify_chunk(lease.chunk, 1)
    lease.release()


def test_read_buffers_are_recycled_only_after_their_lease_is_released(tmp_path):
    """Scenario: reads reuse aligned buffers; a chunk still leased is never overwritten."""
    tier = disk_for(tmp_path, 4)
    for n in (1, 2, 3):
        tier.put(key(n), chunk(n))
    first, second = tier.get(key(1)), tier.get(key(2))
    first_memory, second_memory = first.chunk.kv.data_ptr(), second.chunk.kv.data_ptr()
    assert first_memory != second_memory
    first.release()
    with tier.get(key(3)) as third:  # takes the first lease's buffer back
        assert third.chunk.kv.data_ptr() == first_memory  # reused, not a fresh buffer
        verify_chunk(third.chunk, 3)
        verify_chunk(second.chunk, 2)
    second.release()
    with tier.get(key(1)) as again:  # both buffers free now: one of them again
        assert again.chunk.kv.data_ptr() in (first_memory, second_memory)
        verify_chunk(again.chunk, 1)


def test_restart_rebuilds_the_index_from_the_directory(tmp_path):
    """Scenario: the container restarts on the same instance; its disk cache is still served."""
    first = disk_for(tmp_path, 8)
    for n in range(5):
        first.put(key(n), chunk(n))
    first.close()
    again = disk_for(tmp_path, 8)
    assert again.usage() == first.usage()
    for n in range(5):
        with again.get(key(n)) as lease:
            verify_chunk(lease.chunk, n)


def test_restart_with_a_smaller_budget_evicts_the_oldest_files(tmp_path):
    """Scenario: a restart with a smaller max_local_disk_size; the oldest files go, by mtime."""
    first = disk_for(tmp_path, 8)
    for n in range(6):
        first.put(key(n), chunk(n))
        path = os.path.join(first.directory, key(n).digest.hex())
        os.utime(path, ns=(n * 10**9, n * 10**9))  # n older than n + 1, whatever the clock did
    metrics = EngineMetrics()
    again = disk_for(tmp_path, 4, metrics)
    assert [again.contains(key(n)) for n in range(6)] == [False, False, True, True, True, True]
    assert len(files_in(again)) == 4 and again.usage().used_bytes == 4 * FILE_BYTES
    assert metrics.value("tier_evictions_total", tier="disk") == 2


def test_start_deletes_leftover_temporary_files_and_ignores_unknown_ones(tmp_path):
    tier = disk_for(tmp_path, 4)
    tier.put(key(1), chunk(1))
    leftover = os.path.join(tier.directory, f".tmp-{key(2).digest.hex()}-999-0")
    with open(leftover, "wb") as f:
        f.write(b"half a chunk")
    with open(os.path.join(tier.directory, "notes.txt"), "w") as f:
        f.write("not ours")
    again = disk_for(tmp_path, 4)
    assert not os.path.exists(leftover)
    assert again.usage().num_chunks == 1 and again.contains(key(1))


def test_odirect_is_active_on_the_local_file_system_with_aligned_buffers(tmp_path):
    tier = disk_for(tmp_path, 4, odirect=True)
    assert tier.odirect_active, tier.odirect_reason
    assert probe_odirect(str(tmp_path))[0]
    buffer = AlignedBuffer(100)
    assert buffer.size == ALIGN and buffer.tensor.data_ptr() % ALIGN == 0
    assert tier.put(key(1), chunk(1))
    with tier.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)
    assert not disk_for(tmp_path / "b", 4, odirect=False).odirect_active


def test_a_directory_that_cannot_be_created_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(OSError, match=str(blocker)):
        disk_for(blocker / "cache", 4)
    config = load_config(env={}, overrides={"local_disk": str(blocker / "cache"),
                                            "max_local_disk_size": 1.0})
    with pytest.raises(ConfigError, match="local_disk") as error:
        build_tiers(config, EngineMetrics(), NAMESPACE)
    assert str(blocker) in str(error.value)


def test_eight_threads_writing_and_reading_never_exceed_the_budget(tmp_path):
    """Scenario: 8 threads store and load 64 chunks through a disk tier with room for 16."""
    metrics = EngineMetrics()
    tier = disk_for(tmp_path, 16, metrics)
    wrong: list[int] = []
    served = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            n = rng.randrange(64)
            if rng.random() < 0.5:
                tier.put(key(n), chunk(n))
            elif (lease := tier.get(key(n))) is not None:
                with lease:
                    served.append(n)
                    if not torch.equal(lease.chunk.kv, chunk(n).kv):
                        wrong.append(n)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert served and not wrong
    assert 0 < tier.peak_used_bytes <= tier.budget_bytes
    for counter in ("errors", "corrupt"):
        assert metrics.value(f"tier_{counter}_total", tier="disk") == 0
    on_disk = sum(padded(os.path.getsize(os.path.join(tier.directory, f))) for f in files_in(tier))
    assert on_disk == tier.usage().used_bytes <= tier.budget_bytes
    assert not [f for f in files_in(tier) if f.startswith(".tmp-")]


class BarrierDisk(DiskTier):
    """A real disk tier whose reads wait until 4 are in flight: only parallel reads get through."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.barrier = threading.Barrier(4, timeout=10)

    def get(self, key):
        self.barrier.wait()
        return super().get(key)


def test_one_requests_chunks_are_read_from_disk_in_parallel(tmp_path):
    metrics = EngineMetrics()
    cpu = CPUTier(64 * CHUNK_BYTES, metrics.for_tier("cpu"))
    disk = BarrierDisk(str(tmp_path), 64 * FILE_BYTES, NAMESPACE, True, metrics.for_tier("disk"))
    for n in range(8):
        disk.put(key(n), chunk(n))
    store = TieredStore([cpu, disk], metrics, read_threads=4)
    with closing(store.get_prefix([key(n) for n in range(8)])) as leases:
        for n, lease in enumerate(leases):
            with lease:
                verify_chunk(lease.chunk, n)
    assert metrics.value("tier_hits_total", tier="disk") == 8
    assert all(cpu.contains(key(n)) for n in range(8))  # promoted
    store.close()


def test_a_disk_only_store_reads_one_requests_chunks_in_parallel_too(tmp_path):
    """Scenario: no CPU tier in front (a disk- or Redis-only config): the chunks are still read
    ahead on the reader threads, so a fetch overlaps the decode of the chunk before."""
    metrics = EngineMetrics()
    disk = BarrierDisk(str(tmp_path), 64 * FILE_BYTES, NAMESPACE, True, metrics.for_tier("disk"))
    for n in range(8):
        disk.put(key(n), chunk(n))
    store = TieredStore([disk], metrics, read_threads=4)
    with closing(store.get_prefix([key(n) for n in range(8)])) as leases:
        for n, lease in enumerate(leases):
            with lease:
                verify_chunk(lease.chunk, n)
    assert metrics.value("tier_hits_total", tier="disk") == 8
    store.close()


def test_a_prefix_read_stops_at_the_first_miss_and_releases_what_it_read_ahead(tmp_path):
    metrics = EngineMetrics()
    cpu = CPUTier(2 * CHUNK_BYTES, metrics.for_tier("cpu"))
    disk = disk_for(tmp_path, 16, metrics)
    for n in (0, 1, 3, 4):
        disk.put(key(n), chunk(n))
    store = TieredStore([cpu, disk], metrics, read_threads=4)
    got = []
    with closing(store.get_prefix([key(n) for n in range(5)])) as leases:
        for lease in leases:
            with lease:
                got.append(lease.chunk.kv.clone())
    assert len(got) == 2
    # Every lease was released: the CPU tier can evict everything to take two new chunks.
    assert cpu.put(key(10), chunk(10)) and cpu.put(key(11), chunk(11))
    store.close()


LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)


def test_seed_nvme_config_round_trips_bit_exact_through_the_disk_tier(tmp_path):
    """Scenario: the seed's NVMe file with local_disk on a tmp dir; a chunk evicted from CPU
    comes back from disk bit-exact."""
    config = load_config(path=str(SEED_NVME), env={}, overrides={"local_disk": str(tmp_path)})
    engine = CacheEngine(config, LAYOUT, model_name="test-model")
    assert [t.name for t in engine.storage.tiers] == ["cpu", "disk"]
    cpu, disk = engine.storage.tiers
    assert disk.odirect_active
    tokens = list(range(3 * 256 + 10))
    kv = torch.randn(LAYOUT.shape(len(tokens))).to(LAYOUT.dtype)
    assert engine.store(tokens, kv) == 3 * 256
    engine.flush()
    spans = engine.spans(tokens)
    for span in spans:
        assert disk.contains(span.key) and cpu.remove(span.key)
    assert engine.lookup(tokens) == 3 * 256
    dest = torch.zeros_like(kv)
    assert engine.retrieve(tokens, dest) == 3 * 256
    assert torch.equal(dest[:, :, :768], kv[:, :, :768])
    assert engine.metrics.value("tier_hits_total", tier="disk") == 3
    engine.close()
