"""One rank's loads: cached chunks into vLLM's paged blocks, in the step or in the background.

A load copies each cached chunk straight from the tier's buffer into the request's blocks (one
copy per chunk; only the positions vLLM asked for) through a ``LoadPipeline``, then drops the
request's pin. A failed or short load reports its blocks so vLLM recomputes them; it never
raises. A background load runs on the loader thread and is reported once done
(``take_background_loads``), failed blocks included.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from lmcache_ext import kernels
from lmcache_ext.adapters.vllm.background import BackgroundJobs
from lmcache_ext.adapters.vllm.load_pipeline import LoadPipeline, LoadStreams
from lmcache_ext.adapters.vllm.metadata import TransferOp
from lmcache_ext.adapters.vllm.stats import StageClock, StatsTally
from lmcache_ext.adapters.vllm.worker_kv import RankKV
from lmcache_ext.adapters.vllm.worker_pins import RankPins
from lmcache_ext.engine import CacheEngine
from lmcache_ext.keys import ChunkSpan
from lmcache_ext.storage import ChunkLease

log = logging.getLogger(__name__)
MAX_PENDING_LOADS = 1024  # background loads queued (each holds a pin, no memory)


class RankLoads:
    """``load`` and ``load_in_background`` run on vLLM's model-runner thread, the background
    loads on the loader thread (``jobs``); ``take_background_loads`` is thread-safe."""

    def __init__(self, engine: CacheEngine, kv: RankKV, pins: RankPins, tally: StatsTally,
                 rank: int, clock: StageClock | None = None):
        self.engine, self.kv, self.pins, self.tally, self.rank = engine, kv, pins, tally, rank
        self.clock = clock or StageClock()  # the loads' reads, scatters and the rest
        # Background loads: each holds only its pin, so the queue is as long as vLLM's batch.
        self.jobs = BackgroundJobs(f"lmcache-ext-load-r{rank}", MAX_PENDING_LOADS, lambda: None)
        self._done: set[str] = set()  # background loads done, not reported to vLLM yet
        self._failed_blocks: set[int] = set()  # the blocks those could not fill
        self._lock = threading.Lock()

    def load(self, op: TransferOp) -> set[int]:
        """Copy positions [start, end) of the request's cached chunks into its blocks, in the
        step (vLLM's thread); the block ids whose positions could not be loaded (vLLM
        recomputes them). The copies run on the step's streams after what the current stream
        has queued, and the current stream waits for them on the device (no host wait for the
        scatters: the forward pass is queued behind them)."""
        return self._load(op, self.kv.order.mark(), background=False)

    def load_in_background(self, op: TransferOp) -> None:
        """Queue ``op`` (a load into blocks nothing else uses until it is done) on the loader
        thread; ``take_background_loads`` reports it once done, failed blocks included. Its
        copies wait (on the device) for everything vLLM's current stream has queued now: a
        forward pass still using blocks this load reuses finishes first."""
        planned = self.kv.order.mark()
        self.jobs.submit(lambda: self._background_load(op, planned))

    def take_background_loads(self) -> tuple[set[str], set[int]]:
        """The requests whose background loads finished since the last call, and the blocks
        those loads could not fill (vLLM recomputes them)."""
        with self._lock:
            done, self._done = self._done, set()
            failed, self._failed_blocks = self._failed_blocks, set()
        return done, failed

    def probe_read_speeds(self) -> None:
        """Seed the tiers' read speeds with what a load does here: the tier's read, the
        host-to-device copy and the scatter into the registered caches, through the load path
        itself. The probe chunk is what the caches' first slots hold (nothing serves yet), so
        they end as they were."""
        kv, tokens = self.kv, self.engine.config.chunk_size
        num_blocks = kv.views[0].num_slots // kv.block_size
        if -(-tokens // kv.block_size) > num_blocks:  # a cache smaller than one chunk
            self.engine.probe_read_speeds()
            return
        slots = kv.host_slots(list(range(num_blocks)), 0, tokens)
        device = kv.views[0].k.device
        chunk = torch.empty(self.engine.layout.shape(tokens), dtype=self.engine.layout.dtype,
                            device=device)  # [layers, 2, tokens, kv_heads, head_dim]
        kernels.gather(kv.views, slots.to(device), chunk, host_slots=slots)

        def load(lease: ChunkLease) -> None:
            pipeline = LoadPipeline(kv.staging, kv.views, kv.step_streams, slots,
                                    kv.order.mark())
            try:
                pipeline.push(lease, 0, tokens, 0)
            finally:
                pipeline.finish()
            kv.step_streams.scatter.synchronize()
        self.engine.probe_read_speeds(chunk.cpu(), load)

    def close(self) -> None:
        """Finish the queued background loads, then stop the loader. Idempotent."""
        self.jobs.close()

    def _background_load(self, op: TransferOp, planned: Any) -> None:
        failed: set[int] = set(op.block_ids)  # if even the load's own handling fails
        try:
            failed = self._load(op, planned, background=True)
        finally:
            with self._lock:
                self._done.add(op.req_id)
                self._failed_blocks.update(failed)

    def _load(self, op: TransferOp, after: Any, background: bool) -> set[int]:
        """``load``, its copies waiting for ``after``; a ``background`` load runs on the
        loader's streams and waits on the host until the blocks hold the KV."""
        began, self.tally.moved = time.perf_counter(), True
        spans = [s for s in self.engine.spans_of(op.digests, op.num_tokens)
                 if s.end > op.start and s.start < op.end]
        found = self.pins.tiers(op.req_id, op.pin_id)
        streams = self.kv.background_streams if background else self.kv.step_streams
        spent = {"read": 0.0, "scatter": 0.0}  # seconds, filled by _copy_in
        try:
            loaded = self._copy_in(op, spans, after, streams, background, spent)
        except Exception:
            log.exception("lmcache-ext: load of request %s failed; it will be recomputed",
                          op.req_id)
            loaded = op.start
        finally:
            self.pins.release(op.req_id, op.pin_id)
        self._count(op, spans, found, loaded, began)
        for stage, seconds in spent.items():
            self.clock.add(stage, seconds)
        self.clock.add("load_other", time.perf_counter() - began - sum(spent.values()))
        if loaded >= op.end:
            return set()
        self.tally.add("failed_loads", 1)
        size = self.kv.block_size
        first, last = max(loaded, op.start) // size, (op.end - 1) // size
        return set(op.block_ids[first:last + 1])

    def _copy_in(self, op: TransferOp, spans: list[ChunkSpan], after: Any,
                 streams: LoadStreams, background: bool, spent: dict[str, float]) -> int:
        """The load's copies through a ``LoadPipeline``; the end of the positions loaded.
        Adds its seconds reading the tier and queuing the scatters to ``spent``."""
        kv = self.kv
        pipeline = LoadPipeline(kv.staging, kv.views, streams,
                                kv.host_slots(op.block_ids, op.start, op.end), after)
        began = time.perf_counter()
        try:
            def copy(span: ChunkSpan, lease: ChunkLease) -> None:
                lo, hi = max(span.start, op.start), min(span.end, op.end)
                pushed = time.perf_counter()
                pipeline.push(lease, lo - span.start, hi - span.start, lo - op.start)
                spent["scatter"] += time.perf_counter() - pushed
            loaded = min(self.engine.retrieve_spans(spans, copy, pipeline.wants_decoded),
                         op.end)
        finally:
            pipeline.finish()
            spent["read"] = time.perf_counter() - began - spent["scatter"]
        if background:
            streams.scatter.synchronize()  # the blocks hold the KV before vLLM is told
        else:
            kv.order.wait_on_current(pipeline.last)  # the forward pass waits on the device
        return loaded

    def _count(self, op: TransferOp, spans: list[ChunkSpan], found: dict[int, str],
               loaded: int, began: float) -> None:
        if self.rank != 0:  # every rank loads the same tokens: counted once
            return
        self.tally.add("loaded_tokens", max(loaded - op.start, 0))
        self.tally.add("load_s", time.perf_counter() - began)
        size = self.engine.config.chunk_size
        for span in spans:  # by the tier each chunk was found in at the lookup
            tokens = min(span.end, loaded) - max(span.start, op.start)
            if tokens > 0:
                self.tally.add(f"loaded_tokens.{found.get(span.start // size, 'unknown')}",
                               tokens)
