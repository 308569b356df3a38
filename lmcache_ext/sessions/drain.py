"""Drain on shutdown: before an instance goes away (SageMaker's scale-in or replacement,
``docker stop``: SIGTERM, then SIGKILL 30 s later), write what its sessions hold to the shared
tier so a session re-created on another instance finds its history there.

Order: every open session's pinned chunks, the most recently used session (newest turn) first,
each session's chunks from token 0 (a later chunk is no use without the earlier ones); then the
shared tier's write-behind queue (chunks stored recently, not yet written). A pinned chunk the
shared tier already holds (written behind earlier) is counted, not written again. Everything
stops at the deadline: what was not written by then is counted and logged, never waited for.

Depends on the engine layer only, so the built-in server and the vLLM connector's workers both
use it. A crash, unlike a drain, loses whatever had not been written behind yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from lmcache_ext.engine import CacheEngine
from lmcache_ext.keys import ChunkKey
from lmcache_ext.sessions.pins import CPU_TIER, SessionPins
from lmcache_ext.storage.base import StorageTier

log = logging.getLogger(__name__)
SHARED_TIER = "remote"


@dataclass(frozen=True)
class DrainReport:
    """What a drain did. Chunks: ``written`` now, ``already`` in the shared tier, ``not_written``
    (the deadline came first, or the write failed); ``queue_left``: write-behind chunks still
    unwritten at the end."""

    sessions: int
    written: int
    already: int
    not_written: int
    queue_left: int
    seconds: float

    @property
    def complete(self) -> bool:
        return self.not_written == 0 and self.queue_left == 0

    def summary(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        return (f"drain {state} in {self.seconds:.2f} s: {self.sessions} session(s), "
                f"{self.written} pinned chunk(s) written to the shared tier, {self.already} "
                f"already there, {self.not_written} not written; write-behind queue: "
                f"{self.queue_left} chunk(s) left unwritten")


def no_shared_tier_note(engine: CacheEngine | None) -> str | None:
    """The start-up warning for sessions without a shared tier (None when there is one)."""
    if engine is not None and engine.storage.tier(SHARED_TIER) is not None:
        return None
    return ("stateful sessions without a shared tier (remote_url unset): a session's history "
            "is lost when this instance is scaled in or replaced; its next turn, re-created "
            "elsewhere, recomputes it")


def drain(engine: CacheEngine, pins: SessionPins | None, timeout_s: float,
          clock: Callable[[], float] = time.monotonic) -> DrainReport | None:
    """Write the sessions' pinned chunks, then the write-behind queue, to the shared tier
    within ``timeout_s`` (see the module docstring). None without a shared tier (nothing to
    do). Never raises for a failing store: a chunk that fails to write is ``not_written``.
    Thread-safe as the engine is; the caller stops new turns first for a complete picture."""
    shared = engine.storage.tier(SHARED_TIER)
    if shared is None:
        return None
    began = clock()
    deadline = began + timeout_s
    sessions = pins.newest_first() if pins is not None else []
    written = already = not_written = 0
    fast = engine.storage.tier(CPU_TIER)
    for _session_id, keys in sessions:
        for key in keys:
            if clock() >= deadline:
                not_written += 1
                continue
            outcome = _write(engine, fast, shared, key)
            written += outcome == "written"
            already += outcome == "already"
            not_written += outcome == "failed"
    left = engine.storage.flush_tier(SHARED_TIER, max(0.0, deadline - clock()))
    report = DrainReport(len(sessions), written, already, not_written, left, clock() - began)
    log.log(logging.INFO if report.complete else logging.WARNING, "%s", report.summary())
    return report


def _write(engine: CacheEngine, fast: StorageTier | None, shared: StorageTier,
           key: ChunkKey) -> str:
    """Put one pinned chunk into the shared tier: "written", "already" or "failed"."""
    try:
        if shared.contains(key):
            return "already"
        lease = fast.get(key) if fast is not None else None
        if lease is None:  # a pin holds it in the CPU tier; gone means nothing to copy from
            return "failed"
        with lease:
            return "written" if shared.put(key, lease.chunk) else "failed"
    except Exception:  # a tier must not raise; if one does, this chunk is not drained
        log.exception("drain: writing a chunk to the %s tier failed", SHARED_TIER)
        engine.metrics.for_tier(SHARED_TIER).errors.inc()
        return "failed"
