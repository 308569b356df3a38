"""Open sessions and their expiry: create, use (the expiry slides), close, and a sweep.

A session ends when it is closed or when ``expiry_s`` pass without a use. Each end calls
``on_end(session_id, state)`` once (to release what the session held, e.g. its pins): on close
in the caller's thread, where an exception from it propagates (the close failed: the caller
answers 424; the session stays closed); on expiry from ``sweep`` (which logs an exception and
goes on) or from the ``use`` that finds the session expired. The store remembers the last
``ended_memory`` ended ids, so a request for one is told "closed" or "expired", not "unknown".

Thread-safe: one lock around the bookkeeping; ``on_end`` runs outside it. Time is
``clock()`` (epoch seconds, default ``time.time``: the expiry is stamped on the wire as a
date), injectable for tests.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lmcache_ext.metrics import SessionMetrics
from lmcache_ext.sessions.protocol import SessionError, check_session_id, new_session_id

TOO_MANY_SESSIONS = 429  # a create over max_open_sessions: the client's to retry later

log = logging.getLogger(__name__)
DEFAULT_ENDED_MEMORY = 65536  # ended ids remembered (~10 MB at worst) to name their state


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"
    EXPIRED = "expired"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class SessionInfo:
    """An open session: its id and when it expires unless used again (epoch seconds)."""

    session_id: str
    expires_at: float


OnEnd = Callable[[str, SessionState], None]


class SessionStore:
    """The open sessions of one server (see the module docstring)."""

    def __init__(self, expiry_s: float, on_end: OnEnd | None = None,
                 clock: Callable[[], float] = time.time,
                 ended_memory: int = DEFAULT_ENDED_MEMORY,
                 metrics: SessionMetrics | None = None, max_open: int | None = None):
        """``metrics`` (open sessions, ends) are left alone when None; ``max_open``: the most
        sessions open at once (None: no cap)."""
        if expiry_s <= 0:
            raise ValueError(f"expiry_s must be > 0, got {expiry_s}")
        self.expiry_s = expiry_s
        self._on_end = on_end or (lambda _id, _state: None)
        self._clock = clock
        self._ended_memory = ended_memory
        self._open: dict[str, float] = {}  # id -> expires_at
        self._ended: OrderedDict[str, SessionState] = OrderedDict()  # oldest first
        self._metrics = metrics
        self._max_open = max_open
        self._lock = threading.Lock()

    def create(self) -> SessionInfo:
        """Open a new session with a fresh, unguessable id. Raises a 429 ``SessionError`` when
        ``max_open`` sessions are open (sweep first, so expired ones do not count)."""
        with self._lock:
            if self._max_open is not None and len(self._open) >= self._max_open:
                raise SessionError(f"{len(self._open)} sessions are open, the most this server "
                                   f"keeps (max_open_sessions): close one, or wait for one to "
                                   f"expire", status=TOO_MANY_SESSIONS)
            session_id = new_session_id()
            while session_id in self._open or session_id in self._ended:
                session_id = new_session_id()  # 128 random bits: never in practice
            expires_at = self._clock() + self.expiry_s
            self._open[session_id] = expires_at
            if self._metrics is not None:
                self._metrics.open.set(len(self._open))
            return SessionInfo(session_id, expires_at)

    def use(self, session_id: str) -> SessionInfo:
        """The open session ``session_id``, its expiry moved to now + ``expiry_s``. Raises a 400
        ``SessionError`` naming the state for a malformed, unknown, closed or expired id."""
        check_session_id(session_id)
        with self._lock:
            state = self._state(session_id)
            if state is SessionState.OPEN:
                expires_at = self._open[session_id] = self._clock() + self.expiry_s
                return SessionInfo(session_id, expires_at)
            ends = session_id in self._open  # expired and not yet swept
            if ends:
                self._end(session_id, SessionState.EXPIRED)
        if ends:
            self._call_on_end(session_id, SessionState.EXPIRED)
        advice = "" if state is SessionState.UNKNOWN else ": create a new one"
        raise SessionError(f"session {session_id} is {state.value}{advice}")

    def close(self, session_id: str) -> None:
        """End the open session ``session_id`` and call ``on_end`` (its exceptions propagate;
        the session is closed all the same). Raises a 400 ``SessionError`` naming the state for
        a session that is not open."""
        check_session_id(session_id)
        with self._lock:
            state = self._state(session_id)
            ends = session_id in self._open  # open, or expired and not yet swept
            if ends:
                self._end(session_id, SessionState.CLOSED if state is SessionState.OPEN
                          else SessionState.EXPIRED)
        if state is SessionState.OPEN:
            self._on_end(session_id, SessionState.CLOSED)
            return
        if ends:
            self._call_on_end(session_id, SessionState.EXPIRED)
        raise SessionError(f"session {session_id} is {state.value}: nothing to close")

    def state(self, session_id: str) -> SessionState:
        """Where ``session_id`` stands now (no side effects; an expired one not yet swept is
        EXPIRED)."""
        with self._lock:
            return self._state(session_id)

    def sweep(self) -> list[str]:
        """End every session past its expiry, calling ``on_end`` for each; returns their ids."""
        with self._lock:
            now = self._clock()
            expired = [sid for sid, expires_at in self._open.items() if expires_at <= now]
            for session_id in expired:
                self._end(session_id, SessionState.EXPIRED)
        for session_id in expired:
            self._call_on_end(session_id, SessionState.EXPIRED)
        return expired

    @property
    def open_count(self) -> int:
        with self._lock:
            return len(self._open)

    # ------------------------------------------------------------------ internals

    def _state(self, session_id: str) -> SessionState:
        """(Lock held.)"""
        expires_at = self._open.get(session_id)
        if expires_at is not None:
            return SessionState.OPEN if expires_at > self._clock() else SessionState.EXPIRED
        return self._ended.get(session_id, SessionState.UNKNOWN)

    def _end(self, session_id: str, state: SessionState) -> None:
        """(Lock held.) Move an open session to the ended ones."""
        del self._open[session_id]
        self._ended[session_id] = state
        while len(self._ended) > self._ended_memory:
            self._ended.popitem(last=False)
        if self._metrics is not None:
            self._metrics.open.set(len(self._open))
            self._metrics.ended.labels(state.value).inc()

    def _call_on_end(self, session_id: str, state: SessionState) -> None:
        """An expiry's ``on_end``: an exception is logged, never raised at the requester."""
        try:
            self._on_end(session_id, state)
        except Exception:
            log.exception("releasing expired session %s failed", session_id)


def sweep_interval(expiry_s: float) -> float:
    """How often a sweeper runs: a quarter of the expiry, at most every 30 s, so a session is
    released at most that long after it expired."""
    return min(expiry_s / 4, 30.0)


class Sweeper:
    """A daemon thread that calls ``store.sweep()`` every ``interval_s`` until ``stop()``, so
    an idle server releases expired sessions too."""

    def __init__(self, store: SessionStore, interval_s: float | None = None):
        self.store = store
        self.interval_s = interval_s if interval_s is not None else sweep_interval(store.expiry_s)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="session-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self.store.sweep()
            except Exception:  # the sweeper keeps going; the next sweep tries again
                log.exception("session sweep failed")
