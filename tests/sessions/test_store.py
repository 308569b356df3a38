"""SessionStore: create, use (sliding expiry), close, expiry with an injected clock, the state
a finished id is reported in, and the sweeper thread."""

from __future__ import annotations

import threading

import pytest

from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.sessions.protocol import SessionError
from lmcache_ext.sessions.store import SessionState, SessionStore, Sweeper


class Clock:
    """Time that moves only when a test moves it."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Ends:
    """Records every ``on_end`` call."""

    def __init__(self):
        self.calls: list[tuple[str, SessionState]] = []

    def __call__(self, session_id: str, state: SessionState) -> None:
        self.calls.append((session_id, state))


def store_with(expiry_s: float = 60.0, **kwargs) -> tuple[SessionStore, Clock, Ends]:
    clock, ends = Clock(), Ends()
    return SessionStore(expiry_s, on_end=ends, clock=clock, **kwargs), clock, ends


def test_create_opens_a_session_that_expires_expiry_seconds_later():
    store, clock, _ = store_with()
    info = store.create()
    assert info.expires_at == clock.now + 60
    assert store.state(info.session_id) is SessionState.OPEN
    assert store.create().session_id != info.session_id
    assert store.open_count == 2


def test_use_slides_the_expiry():
    store, clock, ends = store_with()
    session = store.create().session_id
    clock.now += 50
    assert store.use(session).expires_at == clock.now + 60
    clock.now += 50  # 100 s after creation, 50 after the last use: still open
    assert store.use(session).session_id == session
    assert store.sweep() == [] and ends.calls == []


def test_expiry_ends_a_session_once_and_names_the_state():
    store, clock, ends = store_with()
    session = store.create().session_id
    clock.now += 60
    assert store.state(session) is SessionState.EXPIRED
    assert store.sweep() == [session]
    assert store.sweep() == []
    assert ends.calls == [(session, SessionState.EXPIRED)]
    with pytest.raises(SessionError, match=f"session {session} is expired") as caught:
        store.use(session)
    assert caught.value.status == 400
    assert store.open_count == 0


def test_a_use_after_expiry_but_before_a_sweep_ends_it_too():
    store, clock, ends = store_with()
    session = store.create().session_id
    clock.now += 61
    with pytest.raises(SessionError, match="expired"):
        store.use(session)
    assert ends.calls == [(session, SessionState.EXPIRED)]
    assert store.sweep() == []


def test_close_ends_a_session_and_a_second_close_or_use_names_it_closed():
    store, _, ends = store_with()
    session = store.create().session_id
    store.close(session)
    assert ends.calls == [(session, SessionState.CLOSED)]
    assert store.state(session) is SessionState.CLOSED
    with pytest.raises(SessionError, match=f"session {session} is closed"):
        store.use(session)
    with pytest.raises(SessionError, match="is closed: nothing to close"):
        store.close(session)
    assert len(ends.calls) == 1


def test_unknown_and_malformed_ids():
    store, _, _ = store_with()
    assert store.state("abc123") is SessionState.UNKNOWN
    with pytest.raises(SessionError, match="session abc123 is unknown"):
        store.use("abc123")
    with pytest.raises(SessionError, match="not a session id"):
        store.use("bad id; drop")
    with pytest.raises(SessionError, match="over 256"):
        store.close("a" * 300)


def test_ended_ids_are_remembered_up_to_a_bound_then_unknown():
    store, _, _ = store_with(ended_memory=2)
    first, second, third = (store.create().session_id for _ in range(3))
    for session in (first, second, third):
        store.close(session)
    assert store.state(first) is SessionState.UNKNOWN
    assert store.state(second) is store.state(third) is SessionState.CLOSED


def test_a_failing_release_fails_the_close_but_the_session_is_closed():
    def fail(_session_id, _state):
        raise RuntimeError("release failed")
    store = SessionStore(60.0, on_end=fail, clock=Clock())
    session = store.create().session_id
    with pytest.raises(RuntimeError):
        store.close(session)
    assert store.state(session) is SessionState.CLOSED


def test_a_failing_release_during_a_sweep_is_logged_and_the_sweep_goes_on(caplog):
    clock = Clock()
    released = []

    def release(session_id, _state):
        if not released:
            released.append(None)
            raise RuntimeError("release failed")
        released.append(session_id)
    store = SessionStore(60.0, on_end=release, clock=clock)
    a, b = store.create().session_id, store.create().session_id
    clock.now += 60
    assert sorted(store.sweep()) == sorted([a, b])
    assert len(released) == 2 and "releasing expired session" in caplog.text


def test_open_sessions_and_ends_are_metrics():
    metrics = EngineMetrics().sessions
    store, clock, _ = store_with(metrics=metrics)
    a, b = store.create().session_id, store.create().session_id
    assert metrics.registry.get_sample_value("lmcache_ext_sessions_open") == 2
    store.close(a)
    clock.now += 60
    store.sweep()
    assert metrics.registry.get_sample_value("lmcache_ext_sessions_open") == 0
    for how in ("closed", "expired"):
        assert metrics.registry.get_sample_value("lmcache_ext_sessions_ended_total",
                                                 {"how": how}) == 1
    assert b


def test_the_sweeper_thread_releases_expired_sessions_of_an_idle_server():
    clock = Clock()
    released = threading.Event()
    store = SessionStore(60.0, on_end=lambda _id, _state: released.set(), clock=clock)
    store.create()
    clock.now += 61
    sweeper = Sweeper(store, interval_s=0.01).start()
    try:
        assert released.wait(timeout=30)
    finally:
        sweeper.stop()
    assert store.open_count == 0


def test_concurrent_creates_uses_and_closes_keep_the_books():
    """Scenario: 8 threads each create, use and close 50 sessions at once."""
    store, _, ends = store_with()

    def work():
        for _ in range(50):
            session = store.create().session_id
            store.use(session)
            store.close(session)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.open_count == 0 and len(ends.calls) == 400
