"""Keyed chunks in a shared Redis, against real redis-server processes: a writer without the key
(or with another tenant's) cannot make an endpoint serve its KV."""

from __future__ import annotations

import logging

import pytest
import torch

from lmcache_ext.chunk import HEADER_SIZE, ChunkAuth, ChunkMeta, encode_header, payload_view
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage.remote import RemoteTier
from tests.helpers import chunk, key, verify_chunk
from tests.storage.test_remote import LAYOUT, counter, engine_for, kv_for, tier_for, tokens_for

SECRET = "tenant-a-" + "k" * 32
OTHER_SECRET = "tenant-b-" + "q" * 32
OTHER_NAMESPACE = "other00000000000"


@pytest.fixture
def keyed_env(monkeypatch):
    monkeypatch.setenv("LMX_TEST_KEY_A", SECRET)
    monkeypatch.setenv("LMX_TEST_KEY_B", OTHER_SECRET)


def keyed_tier(url: str, metrics: EngineMetrics | None = None, env: str = "LMX_TEST_KEY_A",
               **overrides) -> RemoteTier:
    return tier_for(url, metrics, remote_auth_key_env=env, **overrides)


def value_of(n: int, auth: ChunkAuth | None, name_key=None) -> bytes:
    """A well-formed value holding chunk ``n`` under ``name_key`` (default ``key(n)``)."""
    kv = chunk(n).kv
    payload = payload_view(kv)
    header = encode_header(name_key or key(n), ChunkMeta.of(kv), payload, auth)
    return header + payload.numpy().tobytes()


def test_a_keyed_value_round_trips_bit_exact_and_is_version_2(redis_server, keyed_env):
    tier = keyed_tier(redis_server.url)
    assert tier.put(key(1), chunk(1))
    with tier.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)
    stored = redis_server.client().get(tier.key_name(key(1)))
    assert stored[4:6] == (2).to_bytes(2, "little")


FORGERIES = {
    # A writer without the key: a perfectly valid unkeyed (version 1) chunk of its own KV.
    "unkeyed value": lambda tier, raw: value_of(9, None, key(1)),
    # A writer with a key of its own (another tenant, or an old key no longer accepted).
    "signed with another key": lambda tier, raw: value_of(9, ChunkAuth(OTHER_SECRET.encode()),
                                                          key(1)),
    "payload altered": lambda tier, raw: _flip(raw.get(tier.key_name(key(1))), HEADER_SIZE + 3),
    # An authentic value, copied under another prefix's name or from another namespace.
    "replayed from another prefix": lambda tier, raw: raw.get(tier.key_name(key(2))),
    "replayed from another namespace": lambda tier, raw: value_of(
        1, ChunkAuth(SECRET.encode()), key(1, OTHER_NAMESPACE)),
}


def _flip(value: bytes, index: int) -> bytes:
    damaged = bytearray(value)
    damaged[index] ^= 0x01
    return bytes(damaged)


@pytest.mark.parametrize("forgery", list(FORGERIES))
def test_a_forged_value_is_a_counted_miss_and_is_deleted(redis_server, keyed_env, forgery):
    metrics = EngineMetrics()
    tier = keyed_tier(redis_server.url, metrics)
    raw = redis_server.client()
    tier.put(key(1), chunk(1))
    tier.put(key(2), chunk(2))
    name = tier.key_name(key(1))
    raw.set(name, FORGERIES[forgery](tier, raw))
    assert tier.get(key(1)) is None
    assert (counter(metrics, "forged"), counter(metrics, "corrupt")) == (1, 0)
    assert not raw.exists(name)
    with tier.get(key(2)) as lease:  # its neighbour is untouched
        verify_chunk(lease.chunk, 2)


@pytest.mark.parametrize("cut", [0, HEADER_SIZE - 1, HEADER_SIZE + 10, -1])
def test_a_truncated_keyed_value_is_a_counted_miss_and_is_deleted(redis_server, keyed_env, cut):
    metrics = EngineMetrics()
    tier = keyed_tier(redis_server.url, metrics)
    raw = redis_server.client()
    tier.put(key(1), chunk(1))
    name = tier.key_name(key(1))
    raw.set(name, raw.get(name)[:cut])
    assert tier.get(key(1)) is None
    assert counter(metrics, "corrupt") + counter(metrics, "forged") == 1
    assert not raw.exists(name)


def test_forged_values_are_logged_once_per_interval_not_per_chunk(redis_server, keyed_env,
                                                                   caplog):
    tier = keyed_tier(redis_server.url)
    raw = redis_server.client()
    for n in range(5):
        raw.set(tier.key_name(key(n)), value_of(n, None))
    with caplog.at_level(logging.WARNING, logger="lmcache_ext.storage.remote"):
        assert all(tier.get(key(n)) is None for n in range(5))
    assert [r.getMessage() for r in caplog.records if "forged" in r.getMessage()] == [
        caplog.records[0].getMessage()]


def test_a_reader_without_the_key_refuses_keyed_values(redis_server, keyed_env):
    # Scenario: an endpoint not given the key yet shares the store with keyed ones.
    keyed_tier(redis_server.url).put(key(1), chunk(1))
    metrics = EngineMetrics()
    assert tier_for(redis_server.url, metrics).get(key(1)) is None
    assert counter(metrics, "corrupt") == 1


def test_during_a_rotation_values_of_the_previous_key_still_hit(redis_server, keyed_env):
    keyed_tier(redis_server.url).put(key(1), chunk(1))  # written under key A
    rotating = keyed_tier(redis_server.url, env="LMX_TEST_KEY_B",
                          remote_auth_previous_key_env="LMX_TEST_KEY_A")
    with rotating.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)
    rotating.put(key(2), chunk(2))  # signed with the new key only
    assert keyed_tier(redis_server.url, env="LMX_TEST_KEY_B").get(key(2)) is not None
    assert keyed_tier(redis_server.url).get(key(2)) is None


def test_two_tenants_with_different_keys_never_serve_each_others_chunks(redis_server,
                                                                        keyed_env):
    # Scenario: two customers' endpoints, same model, same prompt, one Redis, different keys
    # and (by mistake) the same cache_salt. Each sees the other's chunks as forged, never hits.
    prompt = tokens_for(5)
    dest = torch.zeros(LAYOUT.shape(100), dtype=LAYOUT.dtype)
    for writer_key, reader_key in (("LMX_TEST_KEY_A", "LMX_TEST_KEY_B"),
                                   ("LMX_TEST_KEY_B", "LMX_TEST_KEY_A")):
        redis_server.client().flushall()  # else the reader's own chunks of round 1 are left
        writer = engine_for(redis_server.url, remote_auth_key_env=writer_key)
        reader = engine_for(redis_server.url, remote_auth_key_env=reader_key)
        writer.store(prompt, kv_for(100, seed=5))
        writer.flush()
        assert redis_server.client().dbsize() == 6
        assert reader.retrieve(prompt, dest) == 0
        assert reader.metrics.value("tier_hits_total", tier="remote") == 0
        assert reader.metrics.value("tier_forged_total", tier="remote") >= 1  # read-ahead: more
        for engine in (writer, reader):
            engine.close()


def test_tenants_with_different_cache_salts_do_not_even_collide(redis_server, keyed_env):
    # Scenario: the documented set-up: a key and a cache_salt per tenant. Neither sees (nor
    # deletes) the other's values: their names differ.
    tenant_a = engine_for(redis_server.url, remote_auth_key_env="LMX_TEST_KEY_A",
                          cache_salt="customer-a")
    tenant_b = engine_for(redis_server.url, remote_auth_key_env="LMX_TEST_KEY_B",
                          cache_salt="customer-b")
    prompt = tokens_for(6)
    tenant_a.store(prompt, kv_for(100, seed=6))
    tenant_a.flush()
    assert tenant_b.lookup(prompt) == 0
    assert tenant_b.retrieve(prompt, torch.zeros(LAYOUT.shape(100), dtype=LAYOUT.dtype)) == 0
    assert tenant_b.metrics.value("tier_forged_total", tier="remote") == 0
    assert redis_server.client().dbsize() == 6  # tenant A's six chunks, all still there
    for engine in (tenant_a, tenant_b):
        engine.close()


def test_the_engines_start_up_log_says_whether_the_store_is_keyed(redis_server, keyed_env,
                                                                  caplog):
    with caplog.at_level(logging.INFO):
        engine_for(redis_server.url).close()
    assert any(r.levelno == logging.WARNING and "UNAUTHENTICATED" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        engine_for(redis_server.url, remote_auth_key_env="LMX_TEST_KEY_A").close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("chunks keyed" in m for m in messages)
    assert not any("UNAUTHENTICATED" in m for m in messages)
    assert not any(SECRET in m for m in messages)
