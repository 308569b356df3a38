"""One rank's SageMaker session pins, with the sessions' expiry: the connector's worker side keeps
each open session's conversation pinned in its CPU tier (``sessions.pins.SessionPins``: per-session
and total budgets, least recently used session unpinned first) and releases it when the session
is closed (the LMI handler's ``release_session`` over the worker channel) or expires.

Expiry is the guarantee that a pin never outlives its session, even when a close never arrives
(the client vanished, LMI expired the session itself, the handler could not reach this rank): a
session not extended for ``sessions_expiration_s`` (LMI's ``option.sessions_expiration`` unless
set otherwise) is released at the next lookup or save this rank sees, or at ``expire()``. LMI
expires a session that long after its creation, so a pin ends at most one expiration period after
its session's last request. Thread-safe: one lock, held across the pins' calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from lmcache_ext.engine import CacheEngine
from lmcache_ext.keys import ChunkSpan
from lmcache_ext.sessions.drain import DrainReport, drain, no_shared_tier_note
from lmcache_ext.sessions.pins import SessionPins

log = logging.getLogger(__name__)


class WorkerSessions:
    """The open sessions' pins on one rank, released on close or after ``expiration_s`` idle."""

    def __init__(self, engine: CacheEngine, expiration_s: float,
                 clock: Callable[[], float] = time.monotonic):
        """``clock``: seconds, monotonic (tests pass their own)."""
        self.engine = engine
        self.pins = SessionPins(engine)
        if engine.namespace.tp_rank == 0 and (note := no_shared_tier_note(engine)) is not None:
            log.warning("lmcache-ext: %s", note)
        self.expiration_s = expiration_s
        self._clock = clock
        self._last_used: dict[str, float] = {}
        self._lock = threading.Lock()

    def extend(self, session_id: str, spans: Sequence[ChunkSpan]) -> int:
        """Pin the session's conversation ``spans`` (from token 0) as far as cached and within
        budget, and restart its expiry; the tokens it now pins from the start."""
        self.expire()
        with self._lock:
            self._last_used[session_id] = self._clock()
            return self.pins.extend(session_id, spans)

    def release(self, session_id: str) -> int:
        """The session was closed: release its pins; the bytes freed (0 for one pinning
        nothing, e.g. unknown here or closed twice)."""
        with self._lock:
            self._last_used.pop(session_id, None)
            return self.pins.release(session_id)

    def expire(self) -> list[str]:
        """Release every session idle for ``expiration_s`` or more; their ids."""
        with self._lock:
            now = self._clock()
            expired = [s for s, used in self._last_used.items()
                       if now - used >= self.expiration_s]
            for session_id in expired:
                del self._last_used[session_id]
                freed = self.pins.release(session_id)
                log.info("lmcache-ext: session %s expired (idle %.0f s): %d bytes unpinned",
                         session_id, self.expiration_s, freed)
        return expired

    def pinned_bytes(self, session_id: str | None = None) -> int:
        """Bytes one session pins (every session's with None)."""
        return self.pins.pinned_bytes(session_id)

    def drain(self, timeout_s: float) -> DrainReport | None:
        """vLLM is shutting down (SIGTERM): write the sessions' pinned conversations, newest
        first, then the write-behind queue, to the shared tier within ``timeout_s``
        (``sessions.drain``); None without a shared tier or with ``timeout_s`` 0."""
        if timeout_s <= 0:
            return None
        return drain(self.engine, self.pins, timeout_s)

    def close(self) -> None:
        """Release every session's pins (shutdown)."""
        with self._lock:
            self._last_used.clear()
            self.pins.close()
