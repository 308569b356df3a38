"""The drain over a real CacheEngine whose shared tier is a real redis-server: pinned chunks the
shared tier lacks are written (newest session first) and found by another engine, the deadline
is kept and what it cut is counted, and without a shared tier there is nothing to drain."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import torch

from lmcache_ext.chunk import KVLayout
from lmcache_ext.config import load_config
from lmcache_ext.engine import CacheEngine
from lmcache_ext.sessions.drain import drain, no_shared_tier_note
from lmcache_ext.sessions.pins import SessionPins
from lmcache_ext.testing.redis_server import RedisServer, redis_server_binary

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
CHUNK = 16


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    redis_server_binary()  # a missing redis-server fails with the fix, never a skip
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


def engine_on(url: str | None) -> CacheEngine:
    overrides = {"chunk_size": CHUNK, "max_local_cpu_size": 0.01, "remote_url": url}
    return CacheEngine(load_config(env={}, overrides=overrides), LAYOUT, model_name="drain-test")


def conversation(seed: int, chunks: int) -> list[int]:
    return [seed * 10_000 + i for i in range(chunks * CHUNK)]


def turn(engine: CacheEngine, pins: SessionPins, session: str, tokens: list[int]) -> None:
    """A session's turn as a server ends it: store the prompt's KV, pin the conversation."""
    kv = torch.randn(LAYOUT.shape(len(tokens))).to(LAYOUT.dtype)
    engine.store(tokens, kv)
    engine.flush()
    pins.extend(session, engine.spans(tokens))


def forget_shared(url: str) -> None:
    """The shared tier lost what was written behind (a dropped write-behind, an eviction):
    only the drain can put it back."""
    redis.Redis.from_url(url).flushall()


class StepClock:
    """A clock that moves ``step`` seconds each time it is read (a drain that takes time)."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_drain_writes_pinned_chunks_the_shared_tier_lacks_and_another_engine_finds_them(
        redis_url):
    """Scenario: scale-in; the session's history must be in Redis for the next replica."""
    here, elsewhere = engine_on(redis_url), engine_on(redis_url)
    try:
        pins = SessionPins(here)
        history = conversation(1, 4)
        turn(here, pins, "s1", history)
        forget_shared(redis_url)
        assert elsewhere.lookup(history) == 0
        report = drain(here, pins, timeout_s=10)
        assert report is not None and report.complete
        assert (report.sessions, report.written, report.already, report.not_written) == \
            (1, 4, 0, 0)
        assert elsewhere.lookup(history) == 4 * CHUNK
        again = drain(here, pins, timeout_s=10)  # already there: counted, not written
        assert (again.written, again.already) == (0, 4)
    finally:
        here.close()
        elsewhere.close()


def test_the_deadline_cuts_the_drain_newest_session_first_and_counts_the_rest(redis_url):
    """Scenario: too little time; the session used last is drained first, the rest counted."""
    here, elsewhere = engine_on(redis_url), engine_on(redis_url)
    try:
        pins = SessionPins(here)
        older, newer = conversation(1, 3), conversation(2, 3)
        turn(here, pins, "older", older)
        turn(here, pins, "newer", newer)
        forget_shared(redis_url)
        # 1 s per clock read: the start (1), then one read per chunk (2, 3, 4 are before the
        # deadline of 1 + 3.5; 5 is not).
        report = drain(here, pins, timeout_s=3.5, clock=StepClock(1.0))
        assert (report.sessions, report.written, report.not_written) == (2, 3, 3)
        assert not report.complete and "INCOMPLETE" in report.summary()
        assert elsewhere.lookup(newer) == 3 * CHUNK
        assert elsewhere.lookup(older) == 0
    finally:
        here.close()
        elsewhere.close()


def test_a_stopped_shared_store_is_counted_not_written_and_never_raises(tmp_path):
    redis_server_binary()
    server = RedisServer(tmp_path / "redis").start()
    here = engine_on(server.url)
    try:
        pins = SessionPins(here)
        turn(here, pins, "s1", conversation(1, 2))
        server.stop()
        report = drain(here, pins, timeout_s=5)
        assert report.not_written == 2 and report.written == 0 and not report.complete
    finally:
        here.close(discard_queued=True)


def test_without_a_shared_tier_there_is_nothing_to_drain_and_the_start_says_so():
    engine = engine_on(None)
    try:
        pins = SessionPins(engine)
        turn(engine, pins, "s1", conversation(1, 2))
        assert drain(engine, pins, timeout_s=5) is None
        assert "without a shared tier" in no_shared_tier_note(engine)
    finally:
        engine.close()


def test_with_a_shared_tier_the_start_says_nothing(redis_url):
    engine = engine_on(redis_url)
    try:
        assert no_shared_tier_note(engine) is None
    finally:
        engine.close()
