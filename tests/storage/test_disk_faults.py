"""Disk tier faults with real processes, files and file systems: kill -9 mid-write, files damaged
or deleted behind the tier's back, a full file system, a file system without O_DIRECT."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

from lmcache_ext.chunk import KVLayout
from lmcache_ext.config import load_config
from lmcache_ext.engine import CacheEngine
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage import Chunk, CPUTier, DiskTier, TieredStore
from lmcache_ext.storage.direct_io import padded
from lmcache_ext.units import GIB
from tests.helpers import CHUNK_BYTES, chunk, key, verify_chunk

NAMESPACE = key(0).namespace
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIG_SHAPE = (4, 2, 64, 8, 64)  # 512 KiB of float16: big enough for kill -9 to land mid-write


def big_chunk(n: int) -> Chunk:
    """A deterministic 512 KiB chunk for key ``n`` (the same bytes in every process)."""
    generator = torch.Generator().manual_seed(n)
    return Chunk(torch.randn(BIG_SHAPE, generator=generator).to(torch.float16))


def write_forever(directory: str) -> None:
    """Child process body: write chunks 0, 1, 2, ... and report each one done on stdout."""
    tier = DiskTier(directory, GIB, NAMESPACE, use_odirect=True)
    for n in range(100_000):
        assert tier.put(key(n), big_chunk(n))
        print(n, flush=True)


def test_kill_9_in_the_middle_of_writes_serves_no_corrupt_chunk_after_restart(tmp_path):
    """Scenario: the server is killed with SIGKILL while writing chunks; the restarted tier serves
    every completed chunk exactly and nothing else, and leaves no temporary file."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests.storage.test_disk_faults import "
         "write_forever; write_forever(sys.argv[1])", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    done = [int(child.stdout.readline())]
    while done[-1] < 40:
        line = child.stdout.readline()
        assert line, f"the writer died on its own (exit {child.poll()})"
        done.append(int(line))
    os.kill(child.pid, signal.SIGKILL)
    done += [int(line) for line in child.stdout.read().split()]  # written before the kill
    child.wait()
    metrics = EngineMetrics()
    tier = DiskTier(str(tmp_path), GIB, NAMESPACE, True, metrics.for_tier("disk"))
    assert not [f for f in os.listdir(tier.directory) if f.startswith(".tmp-")]
    for n in range(done[-1] + 5):
        lease = tier.get(key(n))
        if lease is None:
            assert n not in done, f"completed chunk {n} lost"
            continue
        with lease:
            assert torch.equal(lease.chunk.kv, big_chunk(n).kv), f"chunk {n} corrupt"
    assert metrics.value("tier_corrupt_total", tier="disk") == 0


def flip_byte(offset: int):
    def damage(path: str) -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
    return damage


def truncate(path: str) -> None:
    os.truncate(path, 1000)


def append_garbage(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"x" * 5000)


def swap_in_another_chunk(path: str) -> None:
    other = os.path.join(os.path.dirname(path), key(2).digest.hex())
    os.replace(other, path)


@pytest.mark.parametrize("damage", [
    truncate, flip_byte(0), flip_byte(40), flip_byte(128), flip_byte(128 + CHUNK_BYTES - 1),
    append_garbage, swap_in_another_chunk,
], ids=["truncated", "magic", "header-shape", "payload-first", "payload-last", "grown",
        "another-key"])
def test_a_damaged_file_is_detected_counted_deleted_and_never_served(tmp_path, damage):
    """Scenario: a chunk file is changed behind the tier's back; the next read is a miss."""
    metrics = EngineMetrics()
    tier = DiskTier(str(tmp_path), 1 << 20, NAMESPACE, True, metrics.for_tier("disk"))
    for n in (1, 2):
        tier.put(key(n), chunk(n))
    path = os.path.join(tier.directory, key(1).digest.hex())
    damage(path)
    assert tier.get(key(1)) is None
    assert metrics.value("tier_corrupt_total", tier="disk") == 1
    assert not os.path.exists(path) and not tier.contains(key(1))
    assert tier.get(key(1)) is None  # stays a miss, counted once
    assert metrics.value("tier_corrupt_total", tier="disk") == 1
    assert tier.put(key(1), chunk(1))  # and can be stored again
    with tier.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)


def test_a_deleted_file_is_a_counted_miss_and_its_bytes_are_given_back(tmp_path):
    """Scenario: an operator deletes chunk files while the tier runs."""
    metrics = EngineMetrics()
    tier = DiskTier(str(tmp_path), 1 << 20, NAMESPACE, True, metrics.for_tier("disk"))
    for n in range(3):
        tier.put(key(n), chunk(n))
    os.unlink(os.path.join(tier.directory, key(1).digest.hex()))
    assert tier.get(key(1)) is None and not tier.contains(key(1))
    assert metrics.value("tier_corrupt_total", tier="disk") == 1
    assert tier.usage().used_bytes == 2 * padded(128 + CHUNK_BYTES)
    with tier.get(key(2)) as lease:
        verify_chunk(lease.chunk, 2)


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a small tmpfs under tmp_path (root only; CI runs as root): a file system the test
    can fill. Unmounted afterwards. A mount that fails fails the test, never skips it."""
    mounted = []

    def mount(size: str) -> str:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                 str(point)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs at {point} (these tests need root): "
                        f"{result.stderr.strip()}")
        mounted.append(point)
        return str(point)

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_file_system_stores_nothing_more_and_requests_keep_succeeding(mount_tmpfs, caplog):
    """Scenario: the disk fills up (ENOSPC) below the configured budget."""
    directory = mount_tmpfs("1m")
    metrics = EngineMetrics()
    tier = DiskTier(directory, GIB, NAMESPACE, False, metrics.for_tier("disk"))
    caplog.set_level(logging.ERROR, logger="lmcache_ext.storage.disk")
    results = [tier.put(key(n), chunk(n)) for n in range(400)]  # 400 x 4 KiB > 1 MiB
    assert True in results and results[-1] is False
    errors = metrics.value("tier_errors_total", tier="disk")
    assert errors == results.count(False) > 0
    assert len([r for r in caplog.records if "failed, not stored" in r.message]) == 1
    names = os.listdir(tier.directory)
    assert not [f for f in names if f.startswith(".tmp-")]
    assert tier.usage().used_bytes == len(names) * padded(128 + CHUNK_BYTES)
    assert tier.usage().num_chunks == results.count(True) == len(names)
    tier.remove(key(0))  # room again: stores work again
    assert tier.put(key(1000), chunk(1000))


def test_engine_store_and_retrieve_succeed_on_a_full_disk(mount_tmpfs):
    """Scenario: CPU + disk tiers, the disk full: the request neither fails nor loses CPU hits."""
    directory = mount_tmpfs("64k")
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
    config = load_config(env={}, overrides={"chunk_size": 16, "local_disk": directory,
                                            "max_local_disk_size": 1.0, "max_local_cpu_size": 0.01})
    engine = CacheEngine(config, layout, model_name="m")
    metrics = engine.metrics
    filler = DiskTier(directory, GIB, NAMESPACE, False, EngineMetrics().for_tier("disk"))
    n = 0
    while filler.put(key(n), chunk(n)):  # fill the file system through another namespace
        n += 1
    tokens = list(range(64))
    kv = torch.randn(layout.shape(64)).to(layout.dtype)
    assert engine.store(tokens, kv) == 64
    engine.flush()
    dest = torch.zeros_like(kv)
    assert engine.retrieve(tokens, dest) == 64 and torch.equal(dest, kv)
    assert metrics.value("tier_errors_total", tier="disk") > 0
    engine.close()


def test_tmpfs_ignores_odirect_so_the_tier_says_so_once_and_uses_buffered_io(mount_tmpfs, caplog):
    directory = mount_tmpfs("4m")
    caplog.set_level(logging.WARNING, logger="lmcache_ext.storage.disk")
    tier = DiskTier(directory, 1 << 20, NAMESPACE, True)
    assert not tier.odirect_active
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and directory in warnings[0] and "tmpfs" in warnings[0]
    assert tier.put(key(1), chunk(1))
    with tier.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)


def test_store_survives_a_tier_that_fails_every_write_while_reads_continue(tmp_path):
    """Scenario: the cache directory is removed under a running tier: puts fail (counted),
    gets miss, nothing raises."""
    metrics = EngineMetrics()
    tier = DiskTier(str(tmp_path), 1 << 20, NAMESPACE, True, metrics.for_tier("disk"))
    tier.put(key(1), chunk(1))
    store = TieredStore([CPUTier(1 << 20, metrics.for_tier("cpu")), tier], metrics)
    for name in os.listdir(tier.directory):
        os.unlink(os.path.join(tier.directory, name))
    os.rmdir(tier.directory)
    assert store.put(key(2), chunk(2))
    store.flush()
    assert metrics.value("tier_errors_total", tier="disk") == 1
    assert tier.get(key(1)) is None
    assert tier.usage().used_bytes == 0
    store.close()
