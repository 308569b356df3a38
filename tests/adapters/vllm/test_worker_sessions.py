"""A worker rank's session pins expire: a session not extended for sessions_expiration_s is
unpinned at the next lookup or save the rank sees, even when no close ever arrives (a real
CacheEngine; the clock is the test's)."""

from __future__ import annotations

from lmcache_ext.adapters.vllm.sessions import WorkerSessions
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
