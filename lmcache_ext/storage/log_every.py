"""Logging of faults that can repeat: at most one line per interval, so a flood (a dying disk, a
store full of forged values) is seen, counted by the tiers' metrics, and not logged per chunk."""

from __future__ import annotations

import threading
import time

LOG_INTERVAL_S = 30.0


class EveryInterval:
    """``due()`` is True at most once per ``seconds``. Thread-safe."""

    def __init__(self, seconds: float = LOG_INTERVAL_S):
        self._seconds = seconds
        self._next = 0.0
        self._lock = threading.Lock()

    def due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                return False
            self._next = now + self._seconds
            return True
