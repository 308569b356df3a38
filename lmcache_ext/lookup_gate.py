"""A cap on the lookups one serving process answers at once: one more is refused, never queued.

A lookup (``lmcache-ext warm``'s, ``/lookup``) waits on the cache (a Redis round trip, or the
vLLM workers' channel for up to ``worker_lookup_timeout_s``). Under a flood of them, waiting in
line would make every lookup slower without bound and hold a thread each; instead, at most
``max_concurrent_lookups`` run at once and the next is turned away at once: the built-in server
answers 429 naming the key, LMI's handler a miss (``cached_tokens`` 0; ``warm`` then sends the
document). Dependency-free: the built-in server and the LMI handler both use it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

KEY = "max_concurrent_lookups"


class LookupGate:
    """Admits at most ``limit`` lookups at once. Thread-safe; ``admit`` never blocks."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"{KEY}: {limit} is not a positive number of lookups")
        self.limit = limit
        self._running = 0
        self._lock = threading.Lock()
        self.refused = 0  # lookups turned away since the start

    @contextmanager
    def admit(self) -> Iterator[bool]:
        """``with gate.admit() as admitted:``: True (and counted as running until the block
        ends) while fewer than ``limit`` run, else False at once (counted in ``refused``)."""
        with self._lock:
            admitted = self._running < self.limit
            if admitted:
                self._running += 1
            else:
                self.refused += 1
        try:
            yield admitted
        finally:
            if admitted:
                with self._lock:
                    self._running -= 1

    @property
    def running(self) -> int:
        with self._lock:
            return self._running

    def refusal(self) -> str:
        """What a refused lookup is told."""
        return (f"{self.limit} lookups are being answered, the most this server answers at once "
                f"({KEY}); retry later")
