"""One rank's saves: the chunks the engine lacks, out of vLLM's paged blocks into the tiers.

In the step (vLLM's thread) each missing chunk is gathered out of the blocks into a staging
buffer (the blocks may be reused after the step); the tiers' writes run on the saver thread,
which gives the buffer back. A save that names a SageMaker session then pins the saved
conversation for it (``sessions``), after that save's stores. A failed save is logged
and counted, never raised: it is a future miss.

The step waits for a staging buffer only as long as the saver's writes take: RAM's when the
first tier is the CPU tier (the default; the slower tiers are written behind it), so it never
waits on a disk or the network. When the first tier does I/O (a store of disk or Redis alone)
the step waits for each buffer at most ``io_wait_s`` (50 ms, or the chunk's bytes at
``IO_TIER_FLOOR_BPS`` if longer): a tier that keeps writing at its speed gets every chunk, as
the CPU tier does; once a buffer is not back in that time (the tier stalled or slowed) the
chunks left are not saved (``skipped_save_tokens``, a future miss), so a slow Redis cannot
stall the steps. (A bound on the whole save instead skipped 12 of a 4K prompt's 16 chunks on a
healthy disk: 16 writes through 4 buffers take longer than 50 ms together.)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from lmcache_ext import kernels
from lmcache_ext.adapters.vllm.background import BackgroundJobs
from lmcache_ext.adapters.vllm.metadata import TransferOp
from lmcache_ext.adapters.vllm.sessions import WorkerSessions
from lmcache_ext.adapters.vllm.stats import StatsTally
from lmcache_ext.adapters.vllm.worker_kv import RankKV
from lmcache_ext.engine import CacheEngine
from lmcache_ext.keys import ChunkSpan
from lmcache_ext.storage.log_every import EveryInterval

log = logging.getLogger(__name__)
MAX_PENDING_SAVES = 8  # saves copied out and waiting for the saver thread (their KV held)
IO_TIER_WAIT_S = 0.05  # the most the step waits for one buffer a disk or Redis holds...
IO_TIER_FLOOR_BPS = 500e6  # ...unless its chunk's bytes at this rate take longer (big chunks)


def io_wait_s(chunk_bytes: int) -> float:
    """How long the step waits for one staging buffer when the first tier does I/O."""
    return max(IO_TIER_WAIT_S, chunk_bytes / IO_TIER_FLOOR_BPS)


class RankSaves:
    """``save`` runs on vLLM's model-runner thread, the stores on the saver thread (``jobs``).
    ``failures`` counts the saves that raised (thread-safe)."""

    def __init__(self, engine: CacheEngine, kv: RankKV, tally: StatsTally,
                 sessions: WorkerSessions | None, rank: int):
        self.engine, self.kv, self.tally, self.sessions, self.rank = \
            engine, kv, tally, sessions, rank
        self.failures = 0  # saves that raised: logged, counted, never passed on
        self._told_skipped = EveryInterval()
        self._lock = threading.Lock()  # the saver thread counts failures too
        self.jobs = BackgroundJobs(f"lmcache-ext-save-r{rank}", MAX_PENDING_SAVES, self._failed)
        layout = engine.layout
        self._io_wait_s = io_wait_s(math.prod(layout.shape(engine.config.chunk_size))
                                    * layout.dtype.itemsize)

    def save(self, op: TransferOp) -> None:
        """Store the request's chunks in [start, end) that the engine lacks (gathering only
        those: a chunk before them that is evicted meanwhile is skipped, never stored from
        memory nobody wrote). A chunked prefill saves each step's new whole chunks in that
        step (``start`` > 0). The KV is copied out of the blocks now; the tiers' writes run on
        the saver thread. With a session, the saver then pins the chunks [0, end) the engine
        holds for it (see ``sessions``). A failure is logged and counted, never raised."""
        began, self.tally.moved = time.perf_counter(), True
        try:
            spans = [s for s in self.engine.spans_of(op.digests, op.num_tokens)
                     if s.end <= op.end]
            self._gather_and_queue([s for s in spans if s.start >= op.start], op.block_ids)
            if op.session is not None and self.sessions is not None:
                session, sessions = op.session, self.sessions
                self.jobs.submit(lambda: sessions.extend(session, spans))  # after the stores
        except Exception:
            self._failed()
            log.exception("lmcache-ext: save of request %s failed (skipped)", op.req_id)
            return
        if self.rank == 0:
            self.tally.add("save_s", time.perf_counter() - began)  # the step's share only

    def close(self) -> None:
        """Finish the queued stores, then stop the saver. Idempotent."""
        self.jobs.close()

    def _gather_and_queue(self, spans: list[ChunkSpan], block_ids: list[int]) -> None:
        """Gather each chunk the engine lacks into a staging buffer (waiting a bounded time for
        one if all are in flight) and queue its store on the saver thread, which gives the
        buffer back. The slots go to the device once, without a host wait. Which chunks the
        engine holds is asked of the in-memory tiers only: a round trip to a shared store on
        vLLM's thread would hold every step (up to ``remote_timeout_s`` while it is slow); the
        saver's ``store_spans`` skips what the shared store holds, off the step."""
        todo = spans[self.engine.storage.prefix_length([s.key for s in spans], local_only=True):]
        if not todo:
            return
        kv, base = self.kv, todo[0].start
        host = kv.host_slots(block_ids, base, todo[-1].end)
        slots = host.to(kv.views[0].k.device, non_blocking=True)
        wait_s = None if self.engine.storage.puts_in_memory else self._io_wait_s
        for i, span in enumerate(todo):
            buffer = kv.staging.acquire() if wait_s is None else \
                kv.staging.acquire_within(wait_s)
            if buffer is None:
                self._skip(todo[i:], wait_s)
                return
            part = buffer[:, :, :span.num_tokens]  # [layers, 2, tokens, kv_heads, head_dim]
            try:
                at = slice(span.start - base, span.end - base)
                kernels.gather(kv.views, slots[at], part, host_slots=host[at])
            except Exception:
                kv.staging.release(buffer)
                raise
            gathered = kv.order.mark()  # the saver's copy waits for the gather, on its stream
            self.jobs.submit(self._store_job(span, buffer, part, gathered))

    def _store_job(self, span: ChunkSpan, buffer: torch.Tensor, part: torch.Tensor,
                   gathered: Any) -> Callable[[], None]:
        queued = time.perf_counter()

        def store() -> None:
            used = None
            try:  # on a GPU the tier's put is the one device-to-host copy
                with self.kv.save_stream.run(gathered):
                    stored = self.engine.store_spans([span], part, span.start)
                    used = self.kv.save_stream.mark()
            finally:
                self.kv.staging.release(buffer, used)
            if self.rank == 0:
                self.tally.add("stored_tokens", stored)
                self.tally.add("store_s", time.perf_counter() - queued)
        return store

    def _skip(self, spans: list[ChunkSpan], waited_s: float) -> None:
        """``spans`` found no staging buffer in time (the first tier's writes are slow): not
        saved, counted (rank 0's count, as ``stored_tokens``; under tensor parallelism a chunk
        one rank skipped is a miss for all: a lookup takes the ranks' least), logged once an
        interval."""
        tokens = sum(s.num_tokens for s in spans)
        if self.rank == 0:
            self.tally.add("skipped_save_tokens", tokens)
        if self._told_skipped.due():
            log.warning("lmcache-ext: %d tokens not saved: no staging buffer came back from "
                        "the %s tier's writes within %.2f s (put a CPU tier in front to save "
                        "them all)", tokens, self.engine.storage.tiers[0].name, waited_s)

    def _failed(self) -> None:
        with self._lock:
            self.failures += 1
        self.tally.add("failed_saves", 1)
