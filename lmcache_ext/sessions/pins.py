"""A session's conversation held in the CPU tier: pins over a ``CacheEngine``, within budgets.

``extend(session_id, spans)``: ``spans`` are the chunk spans of the session's conversation so far,
from token 0 (the latest turn's prompt, and its output where the caller stored it). Afterwards the
session pins the leading cached chunks of ``spans`` that fit its budgets: chunks it already pins
stay pinned (nothing is read again), new ones are pinned (a slower tier's chunk is promoted), and
chunks it pinned that ``spans`` no longer holds (the conversation took another path) are released.

Two budgets, in bytes of KV: one session's (``session_pin_max_gib``) and all sessions' together
(``session_pins_max_fraction`` of the CPU tier's budget, so unpinned traffic always keeps the
rest). When a new chunk does not fit the total, the least recently extended *other* session is
unpinned whole (it stays open: its next turn is an ordinary lookup), and so on; when nothing is
left to unpin, the session keeps what it has. Nothing here fails a request: a pin only keeps KV
from eviction. A chunk two sessions share is pinned and counted by each (never under-counted).

Depends on the engine layer only (no serving code), so the vLLM connector's worker side can use
it. Thread-safe: one lock, held across the engine's pin calls (a CPU-tier pin takes a lease and
copies nothing; a slower tier's chunk is read once, then stays pinned).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmcache_ext.chunk import ChunkMeta
from lmcache_ext.engine import CacheEngine, PrefixPin
from lmcache_ext.keys import ChunkKey, ChunkSpan
from lmcache_ext.metrics import SessionMetrics
from lmcache_ext.units import GIB

log = logging.getLogger(__name__)
CPU_TIER = "cpu"


@dataclass(frozen=True)
class PinBudget:
    """Byte budgets: one session's, and every session's together (0 = no pins at all)."""

    per_session_bytes: int
    total_bytes: int

    @staticmethod
    def for_engine(engine: CacheEngine) -> PinBudget:
        """The config's budgets: ``session_pin_max_gib``, and ``session_pins_max_fraction`` of
        the engine's CPU tier (no CPU tier: no pins)."""
        config = engine.config
        cpu = next((t for t in engine.storage.tiers if t.name == CPU_TIER), None)
        capacity = cpu.usage().capacity_bytes if cpu is not None else 0
        return PinBudget(int(config.session_pin_max_gib * GIB),
                         int(config.session_pins_max_fraction * capacity))


@dataclass
class _Held:
    """One session's pins, in conversation order."""

    pins: OrderedDict[ChunkKey, tuple[PrefixPin, int]] = field(default_factory=OrderedDict)
    nbytes: int = 0


class SessionPins:
    """The pins of every open session over one engine (see the module docstring)."""

    def __init__(self, engine: CacheEngine, budget: PinBudget | None = None,
                 metrics: SessionMetrics | None = None):
        """``budget`` defaults to the engine config's; ``metrics`` to the engine's session
        metrics."""
        self.engine = engine
        self.budget = budget or PinBudget.for_engine(engine)
        self.metrics = metrics or engine.metrics.sessions
        self._sessions: OrderedDict[str, _Held] = OrderedDict()  # least recently extended first
        self._total = 0
        self._lock = threading.Lock()

    def extend(self, session_id: str, spans: Sequence[ChunkSpan]) -> int:
        """Pin the session's conversation ``spans`` (from token 0) as far as cached and within
        budget; returns the tokens the session now pins from the start. Never raises for lack
        of room (other sessions may be unpinned, see the module docstring). A session not
        known here is started: a caller whose session may have ended while it worked calls
        ``release`` again after checking."""
        with self._lock:
            held = self._sessions.pop(session_id, None) or _Held()
            self._sessions[session_id] = held  # now the most recent
            now: OrderedDict[ChunkKey, tuple[PrefixPin, int]] = OrderedDict()
            now_bytes = pinned_to = 0
            for span in spans:
                entry = held.pins.pop(span.key, None) or self._pin(session_id, span, now_bytes)
                if entry is None:
                    break  # not cached or no room: later chunks are no use without this one
                now[span.key] = entry
                now_bytes += entry[1]
                pinned_to = span.end
            self._drop(held)  # what the conversation no longer holds, or past the first miss
            held.pins, held.nbytes = now, now_bytes
            self.metrics.pinned_bytes.set(self._total)
            return pinned_to

    def release(self, session_id: str) -> int:
        """Release every pin of the session (closed or expired); returns the bytes freed, 0
        for a session that pins nothing."""
        with self._lock:
            held = self._sessions.pop(session_id, None)
            if held is None:
                return 0
            freed = held.nbytes
            self._drop(held)
            self.metrics.pinned_bytes.set(self._total)
        self.metrics.unpinned.labels("ended").inc()
        return freed

    def pinned_bytes(self, session_id: str | None = None) -> int:
        """Bytes one session pins (every session's with None)."""
        with self._lock:
            if session_id is None:
                return self._total
            held = self._sessions.get(session_id)
            return held.nbytes if held is not None else 0

    def newest_first(self) -> list[tuple[str, list[ChunkKey]]]:
        """Every session pinning something, the most recently extended (newest turn) first,
        each with its pinned chunks' keys in conversation order (a drain's order)."""
        with self._lock:
            return [(sid, list(held.pins)) for sid, held in reversed(self._sessions.items())
                    if held.pins]

    def close(self) -> None:
        """Release every session's pins (shutdown)."""
        with self._lock:
            sessions = list(self._sessions)
        for session_id in sessions:
            self.release(session_id)

    # ------------------------------------------------------------------ internals (lock held)

    def _pin(self, session_id: str, span: ChunkSpan,
             session_bytes: int) -> tuple[PrefixPin, int] | None:
        """Pin one more chunk of a session that keeps ``session_bytes`` so far, if it is cached
        and fits both budgets; None otherwise."""
        nbytes = self._chunk_bytes(span.num_tokens)
        if session_bytes + nbytes > self.budget.per_session_bytes:
            return None
        if not self._make_room(session_id, nbytes):
            return None
        pin = self.engine.pin_spans([span])
        if pin.num_chunks == 0:
            return None
        self._total += nbytes
        return pin, nbytes

    def _make_room(self, session_id: str, nbytes: int) -> bool:
        """Unpin least recently extended other sessions until ``nbytes`` more fit the total."""
        if nbytes > self.budget.total_bytes:
            return False
        while self._total + nbytes > self.budget.total_bytes:
            victim = next((sid for sid, h in self._sessions.items()
                           if sid != session_id and h.nbytes), None)
            if victim is None:
                return False
            log.info("session pins over %d bytes: unpinning session %s (least recently used)",
                     self.budget.total_bytes, victim)
            self._drop(self._sessions[victim])
            self.metrics.unpinned.labels("budget").inc()
        return True

    def _drop(self, held: _Held) -> None:
        for pin, nbytes in held.pins.values():
            pin.release()
            self._total -= nbytes
            held.nbytes -= nbytes
        held.pins = OrderedDict()

    def _chunk_bytes(self, num_tokens: int) -> int:
        layout = self.engine.layout
        return ChunkMeta(layout.dtype, layout.shape(num_tokens), num_tokens).nbytes
