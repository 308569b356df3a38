"""Write-behind to a slower tier: a bounded queue and worker threads, off the caller's path.

Each queued item holds a lease on the chunk in the faster tier, so the chunk cannot be evicted
before it reaches the slower tier (a CPU tier smaller than the working set loses nothing the
slower tier has room for). The queue is bounded: when the slower tier cannot keep up, new items
are dropped and counted, never blocking the caller or holding unbounded memory hostage.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from lmcache_ext.keys import ChunkKey
from lmcache_ext.metrics import TierCounters
from lmcache_ext.storage.base import ChunkLease, StorageTier

log = logging.getLogger(__name__)
_STOP = None


class WriteBehind:
    """Copies leased chunks into ``tier`` on ``threads`` background threads."""

    def __init__(self, tier: StorageTier, counters: TierCounters, max_items: int, threads: int = 2):
        self.tier = tier
        self._counters = counters
        self._queue: queue.Queue[tuple[ChunkKey, ChunkLease] | None] = queue.Queue(max_items)
        self._workers = [
            threading.Thread(target=self._run, name=f"write-behind-{tier.name}-{i}", daemon=True)
            for i in range(threads)
        ]
        self._closed = False
        for worker in self._workers:
            worker.start()

    def submit(self, key: ChunkKey, lease: ChunkLease) -> bool:
        """Queue ``lease`` for writing; takes ownership of it. False (and counted) if dropped."""
        if self._closed:
            lease.release()
            return False
        try:
            self._queue.put_nowait((key, lease))
            return True
        except queue.Full:
            lease.release()
            self._counters.dropped.inc()
            return False

    def flush(self, timeout_s: float | None = None) -> int:
        """Block until every queued chunk has been written (or failed), or ``timeout_s`` (None:
        no limit) passed; returns the chunks still queued or being written (0: all done)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        done = self._queue.all_tasks_done  # the queue's own condition, notified by task_done
        with done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                done.wait(left)
            return self._queue.unfinished_tasks

    def close(self, discard_queued: bool = False) -> None:
        """Write what is queued (``discard_queued``: drop it, counted, e.g. a drain that ran
        out of time before an exit), then stop the workers."""
        if self._closed:
            return
        self._closed = True
        while discard_queued:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item[1].release()
                self._counters.dropped.inc()
            self._queue.task_done()
        for _ in self._workers:
            self._queue.put(_STOP)
        for worker in self._workers:
            worker.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            key, lease = item
            try:
                if not self.tier.contains(key):
                    self.tier.put(key, lease.chunk)
            except Exception:  # a tier must not raise; if one does, the chunk is just not stored
                self._counters.errors.inc()
                log.exception("write-behind to the %s tier failed", self.tier.name)
            finally:
                lease.release()
                self._queue.task_done()
        self._queue.task_done()
