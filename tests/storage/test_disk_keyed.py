"""Keyed chunk files for a disk tier on a shared or network file system: a writer without the
key (or with another one) cannot make the tier serve its KV. Real files, real directories."""

from __future__ import annotations

import os
import shutil

import pytest

from lmcache_ext.chunk import ChunkAuth
from lmcache_ext.config import ConfigError, load_config
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage import DiskTier, build_tiers
from tests.helpers import chunk, key, verify_chunk

NAMESPACE = key(0).namespace
OTHER_NAMESPACE = "other00000000000"
AUTH = ChunkAuth(b"disk-key-" + b"k" * 32)
OTHER_AUTH = ChunkAuth(b"another-" + b"q" * 32)


def disk(directory, metrics=None, auth=AUTH, namespace=NAMESPACE) -> DiskTier:
    counters = (metrics or EngineMetrics()).for_tier("disk")
    return DiskTier(str(directory), 1 << 20, namespace, True, counters, auth)


def file_of(tier: DiskTier, n: int) -> str:
    return os.path.join(tier.directory, key(n).digest.hex())


def test_a_keyed_file_round_trips_and_is_version_2(tmp_path):
    tier = disk(tmp_path)
    assert tier.put(key(1), chunk(1))
    with tier.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)
    with open(file_of(tier, 1), "rb") as handle:
        assert handle.read(6)[4:] == (2).to_bytes(2, "little")


def _plant_unkeyed(tmp_path, tier):
    disk(tmp_path, auth=None).put(key(9), chunk(9))  # a writer without the key, same directory
    os.replace(file_of(tier, 9), file_of(tier, 1))  # ... names its KV after a real prefix


def _plant_other_key(tmp_path, tier):
    disk(tmp_path, auth=OTHER_AUTH).put(key(9), chunk(9))
    os.replace(file_of(tier, 9), file_of(tier, 1))


def _replay_other_prefix(tmp_path, tier):
    shutil.copyfile(file_of(tier, 2), file_of(tier, 1))


def _replay_other_namespace(tmp_path, tier):
    other = disk(tmp_path, namespace=OTHER_NAMESPACE)
    other.put(key(1, OTHER_NAMESPACE), chunk(9))
    shutil.copyfile(os.path.join(other.directory, key(1).digest.hex()), file_of(tier, 1))


def _flip_payload(tmp_path, tier):
    with open(file_of(tier, 1), "r+b") as handle:
        handle.seek(200)
        byte = handle.read(1)
        handle.seek(200)
        handle.write(bytes([byte[0] ^ 1]))


@pytest.mark.parametrize("plant", [_plant_unkeyed, _plant_other_key, _replay_other_prefix,
                                   _replay_other_namespace, _flip_payload],
                         ids=["unkeyed", "other-key", "replay-prefix", "replay-namespace",
                              "payload-altered"])
def test_a_forged_file_is_a_counted_miss_and_is_deleted(tmp_path, plant):
    """Scenario: someone else on the shared file system puts KV under one of our names; the
    tier restarts (it adopts files by name) and the next read is a miss."""
    tier = disk(tmp_path)
    for n in (1, 2):
        tier.put(key(n), chunk(n))
    plant(tmp_path, tier)
    metrics = EngineMetrics()
    restarted = disk(tmp_path, metrics)
    assert restarted.contains(key(1))  # adopted by name: only the read can tell
    assert restarted.get(key(1)) is None
    assert metrics.value("tier_forged_total", tier="disk") == 1
    assert metrics.value("tier_corrupt_total", tier="disk") == 0
    assert not os.path.exists(file_of(tier, 1))
    with restarted.get(key(2)) as lease:
        verify_chunk(lease.chunk, 2)


def test_a_truncated_keyed_file_is_a_counted_miss(tmp_path):
    metrics = EngineMetrics()
    tier = disk(tmp_path, metrics)
    tier.put(key(1), chunk(1))
    os.truncate(file_of(tier, 1), 300)
    assert tier.get(key(1)) is None
    assert metrics.value("tier_corrupt_total", tier="disk") == 1
    assert not os.path.exists(file_of(tier, 1))


def test_the_builder_reads_the_key_from_the_env_var_the_config_names(tmp_path, monkeypatch):
    overrides = {"local_disk": str(tmp_path), "max_local_disk_size": 0.01,
                 "local_disk_auth_key_env": "LMX_TEST_DISK_KEY"}
    config = load_config(env={}, overrides=overrides)
    with pytest.raises(ConfigError, match="local_disk_auth_key_env: 'LMX_TEST_DISK_KEY'"):
        build_tiers(config, EngineMetrics(), NAMESPACE)
    monkeypatch.setenv("LMX_TEST_DISK_KEY", "disk-key-" + "k" * 32)
    tiers = build_tiers(config, EngineMetrics(), NAMESPACE)
    assert tiers[1].put(key(1), chunk(1))
    with disk(tmp_path).get(key(1)) as lease:  # the same secret: the same key
        verify_chunk(lease.chunk, 1)
