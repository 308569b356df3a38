"""The worker side's work off vLLM's step: one background thread per kind of job, in order.

Saves: the worker copies a save's KV out of the paged blocks in the step (the blocks may be
reused right after it) and hands the rest (the tiers' writes, their checksums, the bookkeeping)
to the saver. Background loads: the loader reads the tiers and fills the request's blocks while
vLLM runs other requests. The queue is bounded (``max_pending`` jobs; a save holds its copied-out
KV): when it is full the caller waits for the oldest job to finish (back-pressure, counted)
rather than drop work or grow without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackgroundJobs:
    """Runs jobs one at a time on a daemon thread, in submission order. ``submit`` and
    ``join`` are for one caller thread (vLLM's model runner), ``wait_idle`` for any thread; a
    job that raises is logged and passed to ``on_error``, never to the caller."""

    def __init__(self, name: str, max_pending: int, on_error: Callable[[], None]):
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(max_pending)
        self._on_error = on_error
        self.waits = 0  # submits that found the queue full and waited (the step waited)
        self._pending = 0  # submitted, not finished
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        with self._idle:
            self._pending += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.waits += 1
            self._queue.put(job)

    def join(self) -> None:
        """Wait until every submitted job has finished."""
        self._queue.join()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for the jobs submitted so far (and any after them) to
        finish; True if none is left. Thread-safe."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self) -> None:
        """Finish what is queued, then stop the thread. Idempotent."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                job()
            except Exception:
                log.exception("lmcache-ext: a background job failed (skipped)")
                self._on_error()
            finally:
                if job is not None:
                    with self._idle:
                        self._pending -= 1
                        self._idle.notify_all()
                self._queue.task_done()
