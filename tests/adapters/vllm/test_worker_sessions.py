"""A worker rank's session pins expire: a session not extended for sessions_expiration_s is
unpinned at the next lookup or save the rank sees, even when no close ever arrives (a real
CacheEngine; the clock is the test's)."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext.adapters.vllm.sessions import WorkerSessions
from lmcache_ext.testing.redis_server import RedisServer, redis_server_binary
from tests.sessions.test_drain import CHUNK as CHUNK_DRAIN
from tests.sessions.test_drain import conversation as drain_conversation
from tests.sessions.test_drain import engine_on, forget_shared
from tests.sessions.test_pins import CHUNK, CHUNK_BYTES, conversation, engine_with, flood, stored

EXPIRY_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_idle_session_is_unpinned_after_the_expiry_and_an_active_one_is_not():
    """Scenario: two sessions pinned; one keeps talking, the other goes quiet; past the expiry
    only the quiet one is released, and traffic then evicts its chunks."""
    engine = engine_with(cpu_chunks=16, session_pins_max_fraction=0.75)
    clock = Clock()
    sessions = WorkerSessions(engine, EXPIRY_S, clock)
    quiet, talker = conversation(1, 2), conversation(2, 2)
    assert sessions.extend("quiet", stored(engine, quiet)) == 2 * CHUNK
    assert sessions.extend("talker", stored(engine, talker)) == 2 * CHUNK
    clock.now += EXPIRY_S - 1
    assert sessions.expire() == []
    talker = talker + conversation(3, 1)
    assert sessions.extend("talker", stored(engine, talker)) == 3 * CHUNK  # restarts its expiry
    clock.now += 1
    assert sessions.expire() == ["quiet"]
    assert sessions.pinned_bytes("quiet") == 0
    assert sessions.pinned_bytes("talker") == 3 * CHUNK_BYTES
    flood(engine, 40)
    assert engine.lookup(quiet) == 0
    assert engine.lookup(talker) == 3 * CHUNK


def test_a_new_sessions_pin_first_releases_the_expired_ones():
    """Scenario: no lookup came between; the next extend expires the idle session before it
    pins, so the expired session's bytes never crowd out the live one."""
    engine = engine_with(cpu_chunks=8, session_pins_max_fraction=0.5)
    clock = Clock()
    sessions = WorkerSessions(engine, EXPIRY_S, clock)
    sessions.extend("old", stored(engine, conversation(1, 4)))
    clock.now += EXPIRY_S
    assert sessions.extend("new", stored(engine, conversation(2, 4))) == 4 * CHUNK
    assert sessions.pinned_bytes("old") == 0


def test_release_and_close_free_everything_and_tolerate_repeats():
    engine = engine_with(cpu_chunks=16)
    sessions = WorkerSessions(engine, EXPIRY_S, Clock())
    sessions.extend("a", stored(engine, conversation(1, 2)))
    sessions.extend("b", stored(engine, conversation(2, 2)))
    assert sessions.release("a") == 2 * CHUNK_BYTES
    assert sessions.release("a") == 0
    assert sessions.release("never-seen") == 0
    sessions.close()
    assert sessions.pinned_bytes() == 0
    assert sessions.expire() == []


@pytest.fixture
def redis_url(tmp_path):
    redis_server_binary()  # a missing redis-server fails with the fix, never a skip
    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.stop()


def test_a_ranks_drain_writes_its_sessions_to_the_shared_tier_and_zero_time_drains_nothing(
        redis_url):
    """Scenario: vLLM shuts the connector down (SIGTERM); the rank's session history is in
    Redis afterwards even though its write-behind copy was lost."""
    engine = engine_on(redis_url)
    try:
        sessions = WorkerSessions(engine, EXPIRY_S, Clock())
        history = drain_conversation(1, 2)
        kv = torch.zeros(engine.layout.shape(len(history)), dtype=engine.layout.dtype)
        engine.store(history, kv)
        engine.flush()
        sessions.extend("s1", engine.spans(history))
        forget_shared(redis_url)
        assert sessions.drain(0) is None  # drain_timeout_s = 0: no drain
        report = sessions.drain(10)
        assert report.complete and (report.sessions, report.written) == (1, 2)
        elsewhere = engine_on(redis_url)
        assert elsewhere.lookup(history) == 2 * CHUNK_DRAIN
        elsewhere.close()
    finally:
        engine.close()
