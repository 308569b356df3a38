"""Encryption at rest (AES-256-GCM) in the disk and Redis tiers, against real files and a real
redis-server: whoever reads the store reads no KV, and a value that does not open is a counted
miss (altered, moved to another key, sealed with another key, or not sealed at all)."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext.chunk import MAGIC
from lmcache_ext.codecs import ChunkSealer, ChunkStage
from lmcache_ext.codecs.seal import ENVELOPE_SIZE, SEAL_MAGIC
from lmcache_ext.config import ConfigError, load_config
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage import Chunk, build_tiers
from lmcache_ext.storage.auth import chunk_sealer
from tests.codecs.test_tiers import kv, verify_close
from tests.codecs.tiers import KINDS, NAMESPACE, Place, counter
from tests.helpers import key

OLD = b"old-secret-" + b"o" * 32
NEW = b"new-secret-" + b"n" * 32
OTHER = b"other-tenant-" + b"t" * 32


@pytest.fixture(params=KINDS)
def place(request, tmp_path):
    server = request.getfixturevalue("redis_server") if request.param == "remote" else None
    return Place(request.param, tmp_path, server)


@pytest.mark.parametrize("codec", ["raw", "int4"])
def test_a_sealed_value_round_trips_and_shows_no_kv(place, codec):
    tier = place.tier(codec, ChunkSealer(NEW))
    assert tier.put(key(1), Chunk(kv(1)))
    with tier.get(key(1)) as lease:
        verify_close(lease.chunk.kv, 1, codec)
    stored = place.stored(tier, 1)
    assert stored.startswith(SEAL_MAGIC) and MAGIC not in stored
    plain = kv(1).view(-1).view(torch.uint8).numpy().tobytes()
    assert plain[:64] not in stored and key(1).digest not in stored


def test_each_value_gets_a_fresh_nonce():
    sealer = ChunkSealer(NEW)
    first, second = sealer.seal(key(1), b"x" * 100), sealer.seal(key(1), b"x" * 100)
    assert first[13:25] != second[13:25] and first[ENVELOPE_SIZE:] != second[ENVELOPE_SIZE:]


def _flip(value: bytes, index: int) -> bytes:
    damaged = bytearray(value)
    damaged[index] ^= 0x01
    return bytes(damaged)


ATTACKS = {
    "ciphertext altered": lambda place, tier: _flip(place.stored(tier, 1), ENVELOPE_SIZE + 200),
    "envelope length altered": lambda place, tier: _flip(place.stored(tier, 1), 25),
    "moved from another key": lambda place, tier: place.stored(tier, 2),
    "sealed with another key": lambda place, tier: ChunkStage(sealer=ChunkSealer(OTHER)).encode(
        key(1), kv(9)),
    "not sealed at all": lambda place, tier: place.stored(place.tier(), 9),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_value_that_does_not_open_is_a_counted_miss(place, attack):
    metrics = EngineMetrics()
    tier = place.tier("raw", ChunkSealer(NEW), metrics)
    for n in (1, 2):
        tier.put(key(n), Chunk(kv(n)))
    place.tier().put(key(9), Chunk(kv(9)))  # an unsealed value someone with write access made
    value = ATTACKS[attack](place, tier)
    place.plant(tier, 1, value)
    assert tier.get(key(1)) is None
    assert counter(metrics, place.kind, "forged") + counter(metrics, place.kind, "corrupt") == 1
    if attack != "envelope length altered":  # a length past the value reads as damage
        assert counter(metrics, place.kind, "forged") == 1


def test_a_sealed_value_in_a_tier_without_the_key_is_a_counted_miss(place):
    metrics = EngineMetrics()
    place.tier("int8", ChunkSealer(NEW)).put(key(1), Chunk(kv(1)))
    plain_tier = place.tier(metrics=metrics)
    if place.kind == "disk":  # the index was rebuilt from the directory at start
        assert plain_tier.contains(key(1))
    assert plain_tier.get(key(1)) is None
    assert counter(metrics, place.kind, "corrupt") == 1


def test_a_rotation_reads_old_values_and_writes_new_ones(place):
    """Scenario: the operator rotates: the new secret encrypts, the old one is still accepted
    for reading until the store has turned over; then the old one is dropped."""
    place.tier("int4", ChunkSealer(OLD)).put(key(1), Chunk(kv(1)))
    rotating = place.tier("int4", ChunkSealer(NEW, previous=OLD))
    with rotating.get(key(1)) as lease:
        verify_close(lease.chunk.kv, 1, "int4")
    rotating.put(key(2), Chunk(kv(2)))
    metrics = EngineMetrics()
    rotated = place.tier("int4", ChunkSealer(NEW), metrics)
    with rotated.get(key(2)) as lease:
        verify_close(lease.chunk.kv, 2, "int4")
    assert rotated.get(key(1)) is None
    assert counter(metrics, place.kind, "forged") == 1


def test_the_builder_reads_the_secrets_from_the_env_vars_the_config_names(tmp_path):
    env = {"DISK_SEAL": NEW.decode(), "DISK_SEAL_OLD": OLD.decode()}
    config = load_config(env={}, overrides={
        "local_disk": str(tmp_path), "max_local_disk_size": 0.01, "local_cpu": False,
        "local_disk_encryption_key_env": "DISK_SEAL",
        "local_disk_encryption_previous_key_env": "DISK_SEAL_OLD"})
    sealer = chunk_sealer(config, "disk", env)
    assert repr(sealer) == "ChunkSealer(2 key(s))" and NEW.decode() not in repr(sealer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISK_SEAL", NEW.decode())
        patch.setenv("DISK_SEAL_OLD", OLD.decode())
        (tier,) = build_tiers(config, EngineMetrics(), NAMESPACE)
    tier.put(key(1), Chunk(kv(1)))
    assert Place("disk", tmp_path, None).stored(tier, 1).startswith(SEAL_MAGIC)


@pytest.mark.parametrize("env,needle", [
    ({}, "names an env var that is not set"),
    ({"SEAL": "short"}, "at least 32"),
])
def test_a_missing_or_short_secret_is_a_config_error_naming_the_key(env, needle):
    config = load_config(env={}, overrides={"remote_url": "redis://localhost:1",
                                            "remote_encryption_key_env": "SEAL"})
    with pytest.raises(ConfigError) as error:
        chunk_sealer(config, "remote", env)
    assert "remote_encryption_key_env" in str(error.value) and needle in str(error.value)
    assert "short" not in str(error.value).replace("shorter", "")


def test_a_previous_key_without_a_current_one_is_a_config_error():
    config = load_config(env={}, overrides={"remote_url": "redis://localhost:1",
                                            "remote_encryption_previous_key_env": "OLD"})
    with pytest.raises(ConfigError, match="remote_encryption_previous_key_env.*encrypts"):
        chunk_sealer(config, "remote", {"OLD": OLD.decode()})
