"""SageMaker stateful sessions on the built-in server's ``/invocations``: create, close, and the
turns of a session (see ``sessions/protocol.py`` for the wire facts).

- Create: body ``{"requestType": "NEW_SESSION"}`` (header ``NEW_SESSION`` or none) -> 200 with
  ``<id>; Expires=...`` in both ``X-Amzn-SageMaker-New-Session-Id`` and
  ``X-Amzn-SageMaker-Session-Id``.
- Close: body ``{"requestType": "CLOSE"}`` with the session's id in the header -> 200 with
  ``X-Amzn-SageMaker-Closed-Session-Id``; the session's pins are released.
- A turn: an inference request whose header names an open session slides its expiry; after the
  turn the session pins its conversation (the prompt's stored chunks) so the next turn hits.
- 400: a malformed session request, an id that is unknown, closed or expired (the message says
  which), a session header while sessions are off (LMI's DJL refuses it too); 424: a create or
  close that failed on our side.
Expired sessions are released by a sweep on every session request and by a sweeper thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmcache_ext.config import EngineConfig, key_of, lmi_env_name
from lmcache_ext.engine import CacheEngine
from lmcache_ext.metrics import SessionMetrics
from lmcache_ext.sessions.drain import DrainReport, drain, no_shared_tier_note
from lmcache_ext.sessions.pins import SessionPins
from lmcache_ext.sessions.protocol import (
    CLOSE,
    CLOSED_SESSION_HEADER,
    FAILED_STATUS,
    NEW_SESSION,
    NEW_SESSION_HEADER,
    REQUEST_TYPE,
    SESSION_HEADER,
    SessionError,
    SessionRequest,
    format_new_session,
)
from lmcache_ext.sessions.store import SessionState, SessionStore, Sweeper
from lmcache_ext.units import GIB

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionReply:
    """The answer to a create or close: status, JSON body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class ServerSessions:
    """The server's sessions: the store, the pins (with the cache on) and the sweeper.
    Thread-safe (the HTTP server calls it from a thread per connection)."""

    def __init__(self, config: EngineConfig, engine: CacheEngine | None,
                 metrics: SessionMetrics, clock: Callable[[], float] = time.time):
        self.enabled = config.enable_stateful_sessions
        self.engine = engine
        self.metrics = metrics
        self.pins = SessionPins(engine, metrics=metrics) if engine is not None and \
            self.enabled else None
        self.store = SessionStore(config.sessions_expiration_s, on_end=self._release,
                                  clock=clock, metrics=metrics,
                                  max_open=config.max_open_sessions)
        self._sweeper = Sweeper(self.store).start() if self.enabled else None
        self._log_start(config)

    def _log_start(self, config: EngineConfig) -> None:
        if not self.enabled:
            log.info("stateful sessions: off (enable_stateful_sessions=false): a request with "
                     "%s is refused", SESSION_HEADER)
            return
        if self.pins is None:
            pins = "no pins (cache off)"
        else:
            budget = self.pins.budget
            pins = (f"pins up to {config.session_pin_max_gib:g} GiB per session, "
                    f"{budget.total_bytes / GIB:.3g} GiB in all "
                    f"({config.session_pins_max_fraction:.0%} of the CPU tier)")
        log.info("stateful sessions: on, at most %d open, expiry %g s after last use; %s",
                 config.max_open_sessions, config.sessions_expiration_s, pins)
        if (note := no_shared_tier_note(self.engine)) is not None:
            log.warning("%s", note)

    # ------------------------------------------------------------------ create and close

    def handle(self, request: SessionRequest, header: str | None) -> SessionReply:
        """Answer a create or close; raises a 400 ``SessionError`` for a malformed one."""
        self._require_enabled()
        self.store.sweep()
        if request.request_type == NEW_SESSION:
            return self._create(header)
        return self._close(header)

    def _create(self, header: str | None) -> SessionReply:
        if header is not None and header.strip() != NEW_SESSION:
            raise SessionError(f"{REQUEST_TYPE} {NEW_SESSION}: {SESSION_HEADER} must be "
                               f"{NEW_SESSION} (or absent), got {header[:64]!r}")
        try:
            info = self.store.create()
        except SessionError:  # over max_open_sessions: a 429 naming the key
            raise
        except Exception as exc:
            log.exception("creating a session failed")
            return _failed(f"failed to create a session: {type(exc).__name__}: {exc}")
        value = format_new_session(info.session_id, info.expires_at)
        log.info("session %s created", info.session_id)
        return SessionReply(200, {"result": f"session {info.session_id} created"},
                            {NEW_SESSION_HEADER: value, SESSION_HEADER: value})

    def _close(self, header: str | None) -> SessionReply:
        if header is None or header.strip() in ("", NEW_SESSION):
            raise SessionError(f"{REQUEST_TYPE} {CLOSE}: needs the session's id in "
                               f"{SESSION_HEADER}")
        session_id = header.strip()
        try:
            self.store.close(session_id)
        except SessionError:
            raise
        except Exception as exc:
            log.exception("closing session %s failed", session_id)
            return _failed(f"failed to close session {session_id}: {type(exc).__name__}: "
                           f"{exc}")
        log.info("session %s closed", session_id)
        return SessionReply(200, {"result": f"session {session_id} closed"},
                            {CLOSED_SESSION_HEADER: session_id})

    # ------------------------------------------------------------------ turns

    def begin_turn(self, header: str | None) -> str | None:
        """The open session an inference request names (its expiry slid), None without the
        header; raises a 400 ``SessionError`` for any other case, naming the state."""
        if header is None:
            return None
        self._require_enabled()
        self.store.sweep()
        session_id = header.strip()
        if session_id == NEW_SESSION:
            raise SessionError(f"{SESSION_HEADER}: {NEW_SESSION} goes with the body "
                               f'{{"{REQUEST_TYPE}": "{NEW_SESSION}"}} on a non-streaming '
                               "invocation; create the session first, then send its id")
        return self.store.use(session_id).session_id

    def end_turn(self, session_id: str, spans_of: Callable[[], list], hit_tokens: int) -> None:
        """After a session's turn: count it, and pin its conversation (``spans_of()``: the
        chunk spans stored for it). Never raises: a pin only saves later work."""
        self.metrics.observe_turn(hit_tokens)
        if self.pins is None:
            return
        try:
            self.pins.extend(session_id, spans_of())
            if self.store.state(session_id) is not SessionState.OPEN:
                self.pins.release(session_id)  # it ended during the turn: release released
        except Exception:
            log.exception("pinning session %s's conversation failed", session_id)

    def drain(self, timeout_s: float) -> DrainReport | None:
        """Write the open sessions' pinned conversations, then the write-behind queue, to the
        shared tier within ``timeout_s`` (``sessions.drain``); None when there is nothing to
        drain to (no cache, no shared tier) or ``timeout_s`` is 0."""
        if self.engine is None or timeout_s <= 0:
            return None
        return drain(self.engine, self.pins, timeout_s)

    def close(self) -> None:
        """Stop the sweeper and release every pin (shutdown)."""
        if self._sweeper is not None:
            self._sweeper.stop()
        if self.pins is not None:
            self.pins.close()

    # ------------------------------------------------------------------ internals

    def _require_enabled(self) -> None:
        if not self.enabled:
            switch = lmi_env_name(key_of("enable_stateful_sessions"))
            raise SessionError(f"stateful sessions are not enabled on this endpoint, so "
                               f"{SESSION_HEADER} is not supported (enable_stateful_sessions="
                               f"false; {switch}=true turns them on)")

    def _release(self, session_id: str, _state: SessionState) -> None:
        if self.pins is not None:
            self.pins.release(session_id)


def _failed(message: str) -> SessionReply:
    return SessionReply(FAILED_STATUS, {"error": message})
