"""Remote tier scenarios against real redis-server processes (standalone, cluster, TLS)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmcache_ext.chunk import KVLayout
from lmcache_ext.config import ConfigError, load_config
from lmcache_ext.engine import CacheEngine
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage import Chunk
from lmcache_ext.storage.redis_url import parse_redis_url
from lmcache_ext.storage.remote import UNKNOWN, RemoteSettings, RemoteTier
from lmcache_ext.testing.redis_server import RedisServer, free_port
from tests.helpers import CHUNK_BYTES, chunk, key, verify_chunk

REPO = Path(__file__).resolve().parents[2]
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
CHUNK = 16
HANG_GUARD_S = 5.0  # a call that takes this long hung: not a speed test


def tier_for(url: str, metrics: EngineMetrics | None = None, **overrides) -> RemoteTier:
    config = load_config(env={}, overrides={"remote_url": url, **overrides})
    metrics = metrics or EngineMetrics()
    return RemoteTier(RemoteSettings.from_config(config), metrics.for_tier("remote"))


def engine_for(url: str, **overrides) -> CacheEngine:
    config = load_config(env={}, overrides={"chunk_size": CHUNK, "local_cpu": True,
                                            "max_local_cpu_size": 0.01, "remote_url": url,
                                            **overrides})
    return CacheEngine(config, LAYOUT, model_name="m")


def kv_for(num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.shape(num_tokens), generator=generator).to(LAYOUT.dtype)


def tokens_for(seed: int, count: int = 100) -> list[int]:
    return [seed * 1000 + i for i in range(count)]


def timed(fn):
    start = time.monotonic()
    result = fn()
    elapsed = time.monotonic() - start
    assert elapsed < HANG_GUARD_S, f"call took {elapsed:.1f} s: the tier hung on a dead server"
    return result


def counter(metrics: EngineMetrics, name: str) -> float:
    return metrics.value(f"tier_{name}_total", tier="remote")


# ---------------------------------------------------------------------------- URLs


def test_url_forms_parse_into_targets():
    plain = parse_redis_url("redis://user:p%40ss@cache.example:6380/2")
    assert (plain.host, plain.port, plain.db, plain.username, plain.password) == \
        ("cache.example", 6380, 2, "user", "p@ss")
    assert not plain.tls and not plain.cluster
    assert plain.display() == "redis://user:***@cache.example:6380/2"
    assert parse_redis_url("valkeys://h").tls and parse_redis_url("valkeys://h").port == 6379
    assert parse_redis_url("valkey://h:1").display() == "redis://h:1"
    cluster = parse_redis_url("rediss+cluster://h:7000?ssl_ca_certs=/ca.pem")
    assert cluster.tls and cluster.cluster and cluster.ssl_ca_certs == "/ca.pem"
    for bad in ("memcached://h", "redis://h/x", "redis+cluster://h/1", "redis://h?nope=1",
                "redis://:6379"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


def test_password_env_overrides_the_url_and_an_unset_one_is_a_config_error():
    config = load_config(env={}, overrides={"remote_url": "redis://:inurl@h",
                                            "remote_password_env": "LMX_PW"})
    assert RemoteSettings.from_config(config, env={"LMX_PW": "s3"}).target.password == "s3"
    with pytest.raises(ConfigError, match="remote_password_env"):
        RemoteSettings.from_config(config, env={})


# ---------------------------------------------------------------------------- standalone


def test_put_get_round_trip_is_bit_exact_and_remove_deletes(redis_server):
    metrics = EngineMetrics()
    tier = tier_for(redis_server.url, metrics)
    assert tier.get(key(1)) is None and not tier.contains(key(1))
    assert tier.put(key(1), chunk(1))
    assert tier.contains(key(1))
    with tier.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)
    assert counter(metrics, "stored_bytes") == CHUNK_BYTES
    assert redis_server.client().exists(f"lmcache-ext:{key(1).namespace}:{key(1).digest.hex()}")
    assert tier.remove(key(1)) and not tier.remove(key(1))
    assert tier.get(key(1)) is None
    assert counter(metrics, "errors") == 0


def test_a_strided_chunk_is_stored_as_its_values(redis_server):
    # Scenario: write-through hands the tier a slice of a prompt's KV (not contiguous).
    kv = kv_for(48, seed=3)
    part = kv[:, :, 16:32]
    assert not part.is_contiguous()
    tier = tier_for(redis_server.url)
    assert tier.put(key(1), Chunk(part))
    with tier.get(key(1)) as lease:
        assert torch.equal(lease.chunk.kv, part)


def test_a_hit_is_read_into_a_buffer_its_lease_holds_then_reused(redis_server):
    tier = tier_for(redis_server.url)
    for n in (1, 2, 3):
        tier.put(key(n), chunk(n))
    first, second = tier.get(key(1)), tier.get(key(2))
    held = {first.chunk.kv.data_ptr(), second.chunk.kv.data_ptr()}
    assert len(held) == 2  # two leases held: two buffers
    first.release()
    with tier.get(key(3)) as third:  # read into the buffer the first lease gave back
        assert third.chunk.kv.data_ptr() in held
        verify_chunk(third.chunk, 3)
        verify_chunk(second.chunk, 2)  # the lease still held was not read into
    second.release()


def test_prefix_length_counts_consecutive_keys_in_one_batch(redis_server):
    tier = tier_for(redis_server.url)
    for n in (0, 1, 2, 4):
        tier.put(key(n), chunk(n))
    keys = [key(n) for n in range(6)]
    assert tier.prefix_length(keys) == 3
    assert tier.prefix_length(keys[4:5]) == 1
    assert tier.prefix_length([]) == 0
    raw = redis_server.client()
    before = raw.info("commandstats")["cmdstat_exists"]["calls"]
    tier.prefix_length(keys)
    assert raw.info("commandstats")["cmdstat_exists"]["calls"] - before == 6  # one pipeline


def test_usage_reports_the_servers_memory_and_maxmemory(tmp_path):
    server = RedisServer(tmp_path, extra_args=("--maxmemory", "64mb",
                                               "--maxmemory-policy", "allkeys-lru")).start()
    try:
        tier = tier_for(server.url)
        tier.put(key(1), chunk(1))
        usage = tier.usage()
        assert usage.capacity_bytes == 64 * 1024**2
        assert usage.used_bytes > CHUNK_BYTES and usage.num_chunks == 1
        server.stop()
        assert tier.usage() == usage  # the last answer while the server cannot be asked
    finally:
        server.stop()
    assert tier_for(f"redis://127.0.0.1:{free_port()}").usage().used_bytes == UNKNOWN


def test_no_ttl_by_default_and_remote_ttl_s_sets_one(redis_server):
    raw = redis_server.client()
    tier_for(redis_server.url).put(key(1), chunk(1))
    tier_for(redis_server.url, remote_ttl_s=60, remote_key_prefix="ttl").put(key(1), chunk(1))
    names = {k.split(b":")[0]: k for k in raw.keys("*")}
    assert raw.ttl(names[b"lmcache-ext"]) == -1
    assert 0 < raw.pttl(names[b"ttl"]) <= 60_000


def test_password_from_env_authenticates(tmp_path, monkeypatch):
    server = RedisServer(tmp_path, extra_args=("--requirepass", "s3cret")).start()
    try:
        monkeypatch.setenv("LMX_TEST_REDIS_PW", "s3cret")
        good = tier_for(server.url, remote_password_env="LMX_TEST_REDIS_PW")
        assert good.put(key(1), chunk(1)) and good.contains(key(1))
        assert tier_for(f"redis://default:s3cret@127.0.0.1:{server.port}").contains(key(1))
        metrics = EngineMetrics()
        assert not tier_for(server.url, metrics).contains(key(1))  # NOAUTH: a miss
        assert counter(metrics, "errors") == 1
    finally:
        server.stop()


@pytest.mark.parametrize("tamper", ["garbage", "flipped payload byte", "another key's value"])
def test_a_corrupted_value_is_a_counted_miss_and_is_deleted(redis_server, tamper):
    metrics = EngineMetrics()
    tier = tier_for(redis_server.url, metrics)
    raw = redis_server.client()
    tier.put(key(1), chunk(1))
    tier.put(key(2), chunk(2))
    name = tier.key_name(key(1))
    if tamper == "garbage":
        raw.set(name, b"not a chunk")
    elif tamper == "flipped payload byte":
        value = bytearray(raw.get(name))
        value[200] ^= 0x01
        raw.set(name, bytes(value))
    else:
        raw.set(name, raw.get(tier.key_name(key(2))))
    assert tier.get(key(1)) is None
    assert counter(metrics, "corrupt") == 1
    assert not raw.exists(name)
    with tier.get(key(2)) as lease:  # its neighbour is untouched
        verify_chunk(lease.chunk, 2)


# ---------------------------------------------------------------------------- faults


def test_tls_url_to_a_plain_server_and_a_closed_port_are_misses(redis_server):
    for url in (f"rediss://127.0.0.1:{redis_server.port}", f"redis://127.0.0.1:{free_port()}"):
        metrics = EngineMetrics()
        tier = tier_for(url, metrics, remote_timeout_s=0.5)
        assert timed(lambda t=tier: t.put(key(1), chunk(1))) is False
        assert timed(lambda t=tier: t.get(key(1))) is None
        assert timed(lambda t=tier: t.prefix_length([key(1)])) == 0
        assert not timed(lambda t=tier: t.contains(key(1)) or t.remove(key(1)))
        assert counter(metrics, "errors") >= 3 and tier.backing_off


def test_a_stalled_server_times_out_then_backs_off(redis_server):
    # Scenario: the server is alive but not answering (SIGSTOP): calls end at the timeout,
    # then the tier stops calling it; once it answers again (SIGCONT) hits come back.
    tier = tier_for(redis_server.url, remote_timeout_s=0.2, remote_backoff_s=0.3)
    tier.put(key(1), chunk(1))
    os.kill(redis_server.process.pid, 19)  # SIGSTOP
    try:
        for _ in range(3):
            assert timed(lambda: tier.get(key(1))) is None
        assert tier.backing_off
        start = time.monotonic()
        assert tier.get(key(1)) is None
        assert time.monotonic() - start < 0.05  # no call made while backing off
    finally:
        os.kill(redis_server.process.pid, 18)  # SIGCONT
    time.sleep(0.35)
    with tier.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)


def test_killing_and_restarting_the_server_degrades_to_misses_then_hits_resume(redis_server,
                                                                               caplog):
    engine = engine_for(redis_server.url, remote_backoff_s=0.5, remote_timeout_s=0.5)
    tier = engine.storage.tiers[-1]
    engine.store(tokens_for(1), kv_for(100, 1))
    engine.flush()
    redis_server.stop()
    dest = torch.zeros(LAYOUT.shape(100), dtype=LAYOUT.dtype)
    with caplog.at_level(logging.WARNING, logger="lmcache_ext.storage.remote"):
        for seed in range(2, 6):  # prompts the CPU tier does not hold: the remote tier is asked
            assert timed(lambda s=seed: engine.lookup(tokens_for(s))) == 0
            assert timed(lambda s=seed: engine.retrieve(tokens_for(s), dest)) == 0
            assert timed(lambda s=seed: engine.store(tokens_for(s), kv_for(100, s))) == 96
            timed(engine.flush)  # write-behinds to the dead server fail fast, not hang
        assert tier.backing_off
        assert timed(lambda: engine.lookup(tokens_for(1))) == 96  # the CPU tier still serves
        redis_server.start()
        time.sleep(0.6)  # the back-off interval passes; the tier reconnects by itself
        engine.store(tokens_for(9), kv_for(100, 9))
        engine.flush()
    assert "errors in a row" in caplog.text and "reachable again" in caplog.text
    assert sum("errors in a row" in r.message for r in caplog.records) == 1  # logged once
    fresh = engine_for(redis_server.url)
    assert fresh.lookup(tokens_for(9)) == 96
    assert fresh.retrieve(tokens_for(9), dest) == 96
    assert torch.equal(dest[:, :, :96], kv_for(100, 9)[:, :, :96])


# ---------------------------------------------------------------------------- sharing

_CHILD = """
import sys, torch
from lmcache_ext.config import load_config
from lmcache_ext.engine import CacheEngine
from tests.storage.test_remote import LAYOUT, CHUNK, kv_for, tokens_for
config = load_config(env={}, overrides={"chunk_size": CHUNK, "local_cpu": True,
                                        "remote_url": sys.argv[1]})
engine = CacheEngine(config, LAYOUT, model_name="m")
assert engine.store(tokens_for(7), kv_for(100, 7)) == 96
engine.flush()
engine.close()
"""


def test_two_engines_in_separate_processes_share_a_prefix(redis_server):
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", _CHILD, redis_server.url], cwd=REPO, env=env,
                   check=True, timeout=60)
    engine = engine_for(redis_server.url)
    assert engine.storage.tiers[0].usage().num_chunks == 0  # nothing local: all from Redis
    assert engine.lookup(tokens_for(7)) == 96
    dest = torch.zeros(LAYOUT.shape(100), dtype=LAYOUT.dtype)
    assert engine.retrieve(tokens_for(7), dest) == 96
    assert torch.equal(dest[:, :, :96], kv_for(100, 7)[:, :, :96])
    assert engine.metrics.value("tier_hits_total", tier="remote") == 6


# ---------------------------------------------------------------------------- cluster, TLS


def test_cluster_put_get_and_prefix_length(redis_cluster):
    tier = tier_for(f"redis+cluster://127.0.0.1:{redis_cluster[0].port}")
    for n in range(8):
        assert tier.put(key(n), chunk(n))
    assert tier.prefix_length([key(n) for n in range(10)]) == 8
    tier.remove(key(3))
    assert tier.prefix_length([key(n) for n in range(10)]) == 3
    for n in (0, 7):
        with tier.get(key(n)) as lease:
            verify_chunk(lease.chunk, n)
    held = [int(s.client().dbsize()) for s in redis_cluster]
    assert sum(held) == 7 and sum(1 for h in held if h) >= 2  # keys spread over the nodes
    assert tier.usage().num_chunks == 7
    tier.close()


def test_a_value_whose_slot_moved_is_read_through_the_redirect(redis_cluster):
    """Scenario: a slot moves to another node (resharding) after the tier learned the map: the
    old node answers MOVED, the tier lets redis-py follow it; gets and puts still hit."""
    tier = tier_for(f"redis+cluster://127.0.0.1:{redis_cluster[0].port}")
    assert tier.put(key(1), chunk(1))
    name = tier.key_name(key(1))
    _move_slot_of(name, redis_cluster)
    with tier.get(key(1)) as lease:  # the tier still maps the slot to the old node
        verify_chunk(lease.chunk, 1)
    assert tier.put(key(1), chunk(2))
    with tier.get(key(1)) as lease:
        verify_chunk(lease.chunk, 2)
    tier.close()


def _move_slot_of(name: bytes, servers) -> None:
    clients = [server.client() for server in servers]
    slot = clients[0].execute_command("CLUSTER", "KEYSLOT", name)
    source = next(c for c in clients if c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))
    target = next(c for c in clients if c is not source)
    source_id, target_id = (c.execute_command("CLUSTER", "MYID") for c in (source, target))
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    port = target.connection_pool.connection_kwargs["port"]
    source.execute_command("MIGRATE", "127.0.0.1", port, name, 0, 5000)
    for client in clients:
        client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    held = [c.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) for c in (source, target)]
    assert held == [0, 1]


def test_tls_round_trip_with_a_private_ca(redis_tls_server):
    server, ca = redis_tls_server
    url = f"rediss://127.0.0.1:{server.tls_port}?ssl_ca_certs={ca}"
    tier = tier_for(url)
    assert tier.put(key(1), chunk(1))
    with tier.get(key(1)) as lease:
        verify_chunk(lease.chunk, 1)
    metrics = EngineMetrics()  # without the CA the certificate is not trusted: a miss
    assert tier_for(f"rediss://127.0.0.1:{server.tls_port}", metrics).get(key(1)) is None
    assert counter(metrics, "errors") == 1


def test_a_local_only_prefix_never_asks_the_stalled_server(redis_server):
    """Scenario: CPU + Redis, the server stalled (SIGSTOP): the in-memory question a step
    thread asks (``local_only``) counts the CPU tier's run without a call to the server (no
    error counted, no timeout waited); the full question asks it and gets a miss there."""
    engine = engine_for(redis_server.url, remote_timeout_s=0.2)
    store, remote = engine.storage, engine.storage.tiers[-1]
    assert not remote.local_index and all(t.local_index for t in store.tiers[:-1])
    store.tiers[0].put(key(1), chunk(1))
    remote.put(key(2), chunk(2))
    errors = engine.metrics.value("tier_errors_total", tier="remote")
    os.kill(redis_server.process.pid, 19)  # SIGSTOP
    try:
        assert store.prefix_length([key(1), key(2)], local_only=True) == 1
        assert engine.metrics.value("tier_errors_total", tier="remote") == errors
        assert store.prefix_length([key(1), key(2)]) == 1  # asked: timed out, a miss
        assert engine.metrics.value("tier_errors_total", tier="remote") == errors + 1
    finally:
        os.kill(redis_server.process.pid, 18)  # SIGCONT
    engine.close()
