"""The connector's worker side: one per tensor-parallel rank, in the process that holds the KV.

It owns the rank's ``CacheEngine`` (its tiers live here, beside the KV they copy), answers the
scheduler's lookups (``worker_channel.RankCache``: count the held chunks, pin them until the
load), and moves bytes: a load copies each cached chunk straight from the tier's buffer into the
request's paged blocks (one copy per chunk; only the positions vLLM asked for), a save gathers the
chunks the engine lacks and stores them. A failed or short load reports its blocks as load
errors so vLLM recomputes them; a failed save is logged and counted, never raised. A save that
names a SageMaker session also keeps the saved conversation pinned for it (``worker_sessions``)
until the session is closed (``release_session``) or expires.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmcache_ext import kernels
from lmcache_ext.adapters import vllm_compat
from lmcache_ext.adapters.background import BackgroundJobs
from lmcache_ext.adapters.load_pipeline import LoadPipeline, LoadStreams
from lmcache_ext.adapters.staging import StagingArea
from lmcache_ext.adapters.vllm_metadata import TransferOp
from lmcache_ext.adapters.vllm_stats import TIER_EVENTS, LMCacheExtStats
from lmcache_ext.adapters.worker_channel import LookupRequest, RankAnswer, RankCacheServer
from lmcache_ext.adapters.worker_sessions import WorkerSessions
from lmcache_ext.chunk import KVLayout
from lmcache_ext.engine import CacheEngine, PrefixPin
from lmcache_ext.kernels.streams import StreamOrder
from lmcache_ext.keys import ChunkSpan
from lmcache_ext.storage import ChunkLease

log = logging.getLogger(__name__)
TIER_SAMPLE_S = 1.0  # how often the tiers' counters and usage are read into the stats
MAX_PENDING_SAVES = 8  # saves copied out and waiting for the saver thread (their KV held)
MAX_PENDING_LOADS = 1024  # background loads queued (each holds a pin, no memory)


class ForwardTimer:
    """Times vLLM's forward passes on this rank, for the prefill speed: the wall clock on a
    CPU; on a GPU a pair of CUDA events, read once the GPU has passed them (never waited
    for). Steps of fewer than ``min_tokens`` tokens (decode) are not timed. One thread."""

    def __init__(self, device: torch.device, min_tokens: int):
        self._cuda = device.type == "cuda"
        self._min_tokens = min_tokens
        self._began: Any = None
        self._pending: list[tuple[Any, Any, int]] = []  # (start event, end event, tokens)
        self._tokens, self._seconds = 0, 0.0

    def begin(self) -> None:
        if self._cuda:
            self._began = torch.cuda.Event(enable_timing=True)
            self._began.record()
        else:
            self._began = time.perf_counter()

    def end(self, tokens: int) -> None:
        began, self._began = self._began, None
        if began is None or tokens < self._min_tokens:
            return
        if self._cuda:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self._pending.append((began, ended, tokens))
        else:
            self._tokens, self._seconds = self._tokens + tokens, \
                self._seconds + time.perf_counter() - began

    def take(self) -> tuple[int, float]:
        """Tokens and seconds of the passes timed since the last call."""
        waiting = []
        for began, ended, tokens in self._pending:
            if ended.query():
                self._tokens += tokens
                self._seconds += began.elapsed_time(ended) / 1000
            else:
                waiting.append((began, ended, tokens))
        self._pending = waiting
        done, self._tokens, self._seconds = (self._tokens, self._seconds), 0, 0.0
        return done


@dataclass(frozen=True)
class HeldPin:
    """A request's pin on this rank, taken by the lookup ``pin_id``."""

    pin_id: int
    pin: PrefixPin
    tiers: dict[int, str]  # chunk index -> the tier it was found in (the load counts by tier)


class WorkerSide:
    """One rank's cache and KV mover. ``load``/``save`` run on vLLM's model-runner thread;
    ``lookup``/``release`` on the channel's thread (or the scheduler's, in-process)."""

    def __init__(self, engine: CacheEngine, block_size: int, engine_key: str, rank: int):
        self.engine = engine
        self.block_size = block_size
        self.rank = rank
        self._views: list[kernels.PagedKV] = []
        self._pins: dict[str, HeldPin] = {}  # by request id
        self._pins_lock = threading.Lock()
        self.save_failures = 0  # saves that raised: logged, counted, never passed on
        self.stats = LMCacheExtStats()  # this rank's figures since vLLM last took them
        self._stats_lock = threading.Lock()  # the saver thread counts too
        self._use_device(torch.device("cpu"))  # the streams of the KV's device, at register
        self.timer = ForwardTimer(torch.device("cpu"), engine.config.chunk_size)
        self._tier_totals: dict[str, float] = {}
        self._tier_sampled = 0.0
        self._moved = False  # a load or save since the tiers were last sampled
        self.saver = BackgroundJobs(f"lmcache-ext-save-r{rank}", MAX_PENDING_SAVES,
                                    self._save_failed)
        # Background loads: each holds only its pin, so the queue is as long as vLLM's batch.
        self.loader = BackgroundJobs(f"lmcache-ext-load-r{rank}", MAX_PENDING_LOADS,
                                     lambda: None)
        self._loaded: set[str] = set()  # background loads done, not reported to vLLM yet
        self._loaded_failed_blocks: set[int] = set()  # the blocks those could not fill
        self._loaded_lock = threading.Lock()
        config = engine.config
        self.sessions = (WorkerSessions(engine, config.sessions_expiration_s)
                         if config.enable_stateful_sessions else None)
        self.server = RankCacheServer(engine_key, rank, self)

    # -------------------------------------------------------------- vLLM's caches

    def register(self, kv_caches: dict[str, torch.Tensor], vllm_config: Any) -> None:
        """See vLLM's per-layer caches through strided K/V views (no copy); refuse a layout we
        cannot read, or one that disagrees with the engine's."""
        names = sorted(kv_caches, key=vllm_compat.layer_index)
        layout = self.engine.layout
        caches = [kv_caches[n] for n in names]
        backend = vllm_compat.attention_backend(vllm_config, names)
        paged = vllm_compat.paged_layout(caches[0], layout.num_kv_heads, layout.head_dim, backend)
        self._views = kernels.paged_kv_layers(caches, paged, layout.num_kv_heads, layout.head_dim)
        kernels.prepare(self._views)  # on a GPU: the kernel's per-layer pointer tables, once
        device = self._views[0].k.device
        self.timer = ForwardTimer(device, self.engine.config.chunk_size)
        self.staging = StagingArea(layout, self.engine.config.chunk_size, device,
                                   self.engine.config.staging_chunks)
        self._use_device(device)
        found = KVLayout(len(caches), layout.num_kv_heads, layout.head_dim, self._views[0].k.dtype)
        if found != layout:
            raise kernels.UnsupportedLayout(f"vLLM's KV caches are {found}, its KV cache "
                                            f"config says {layout}")
        log.info("lmcache-ext rank %d: %d KV cache layers, backend %s, %s layout, block size %d",
                 self.rank, len(caches), backend, paged.value, self._views[0].block_size)
        self._probe_loads()  # the cost model needs every tier's load speed from the start
        self._sample_tiers()  # the baseline (the probe's writes are not the service's)
        self.stats.reset()

    def _probe_loads(self) -> None:
        """Seed the tiers' read speeds with what a load does here: the tier's read, the
        host-to-device copy and the scatter into the registered caches, through the load path
        itself. The probe chunk is what the caches' first slots hold (nothing serves yet), so
        they end as they were."""
        tokens = self.engine.config.chunk_size
        num_blocks = self._views[0].num_slots // self.block_size
        if -(-tokens // self.block_size) > num_blocks:  # a cache smaller than one chunk
            self.engine.probe_read_speeds()
            return
        slots = self._host_slots(list(range(num_blocks)), 0, tokens)
        device = self._views[0].k.device
        kv = torch.empty(self.engine.layout.shape(tokens), dtype=self.engine.layout.dtype,
                         device=device)  # [layers, 2, tokens, kv_heads, head_dim]
        kernels.gather(self._views, slots.to(device), kv, host_slots=slots)

        def load(lease: ChunkLease) -> None:
            pipeline = LoadPipeline(self.staging, self._views, self._step_streams, slots,
                                    self._order.mark())
            try:
                pipeline.push(lease, 0, tokens, 0)
            finally:
                pipeline.finish()
            self._step_streams.scatter.synchronize()
        self.engine.probe_read_speeds(kv.cpu(), load)

    def _use_device(self, device: torch.device) -> None:
        """The stream order of ``device`` and the side streams of each thread that copies:
        in-step loads (vLLM's thread), background loads (the loader), saves (the saver)."""
        self._order = StreamOrder(device)
        self._step_streams = LoadStreams(self._order.side(), self._order.side())
        self._bg_streams = LoadStreams(self._order.side(), self._order.side())
        self._save_stream = self._order.side()

    # -------------------------------------------------------------- the scheduler's questions

    def lookup(self, request: LookupRequest) -> RankAnswer:
        """Chunks of the prompt held from the first, the tier of each and the tiers' read
        times; pins chunks [first, held) for the request (replacing its earlier pin). A chunk
        evicted between the count and the pin ends the run there: the answer never counts a
        chunk that is not pinned. Answers from the tiers' indexes only: it never waits for the
        saver (a save still in flight is a miss) and reads no chunk (a chunk in a slower tier
        is read by the load; see ``CacheEngine.pin_in_place``)."""
        if self.sessions is not None:
            self.sessions.expire()
        spans = self.engine.spans_of(request.digests, request.num_tokens)
        tiers = self.engine.locate_spans(spans, request.num_tokens)
        held = len(tiers)
        pin = None
        if held > request.first:
            pin = self.engine.pin_in_place(spans[request.first:held], tiers[request.first:held])
            held = request.first + pin.num_chunks
        with self._pins_lock:
            old = self._pins.pop(request.req_id, None)
            if pin is not None:
                found = {request.first + i: tier
                         for i, tier in enumerate(tiers[request.first:held])}
                self._pins[request.req_id] = HeldPin(request.pin_id, pin, found)
        if old is not None:
            old.pin.release()  # after the new pin: chunks in both are never unpinned between
        return RankAnswer(held, _runs(tiers[:held]), self.chunk_read_s())

    def chunk_read_s(self) -> dict[str, float]:
        """Seconds to read one full chunk from each tier measured so far."""
        layout, tokens = self.engine.layout, self.engine.config.chunk_size
        nbytes = math.prod(layout.shape(tokens)) * layout.dtype.itemsize
        return {tier: nbytes / speed for tier, speed in self.engine.read_speeds().items()}

    def release(self, req_id: str, pin_id: int) -> None:
        with self._pins_lock:
            held = self._pins.get(req_id)
            if held is None or held.pin_id != pin_id:
                return  # already released, or a newer lookup re-pinned the request
            del self._pins[req_id]
        held.pin.release()

    def release_session(self, session_id: str) -> int:
        """The session was closed: unpin its conversation; the bytes freed."""
        freed = self.sessions.release(session_id) if self.sessions is not None else 0
        log.info("lmcache-ext rank %d: session %s closed, %d bytes unpinned", self.rank,
                 session_id, freed)
        return freed

    def num_pins(self) -> int:
        """Requests holding a pin on this rank (a pin that never goes is a leak)."""
        with self._pins_lock:
            return len(self._pins)

    # -------------------------------------------------------------- moving KV

    def load(self, op: TransferOp) -> set[int]:
        """Copy positions [start, end) of the request's cached chunks into its blocks, in the
        step (vLLM's thread); the block ids whose positions could not be loaded (vLLM
        recomputes them). The copies run on the step's streams after what the current stream
        has queued, and the current stream waits for them on the device (no host wait for the
        scatters: the forward pass is queued behind them)."""
        return self._load(op, self._order.mark(), background=False)

    def _load(self, op: TransferOp, after: Any, background: bool) -> set[int]:
        """``load``, its copies waiting for ``after``; a ``background`` load runs on the
        loader's streams and waits on the host until the blocks hold the KV."""
        spans = [s for s in self.engine.spans_of(op.digests, op.num_tokens)
                 if s.end > op.start and s.start < op.end]
        loaded = op.start
        began, self._moved = time.perf_counter(), True
        with self._pins_lock:
            held = self._pins.get(op.req_id)
        found = held.tiers if held is not None and held.pin_id == op.pin_id else {}
        try:
            loaded = self._copy_in(op, spans, after,
                                   self._bg_streams if background else self._step_streams,
                                   background)
        except Exception:
            log.exception("lmcache-ext: load of request %s failed; it will be recomputed",
                          op.req_id)
            loaded = op.start
        finally:
            self.release(op.req_id, op.pin_id)
        self._count_load(op, spans, found, loaded, began)
        if loaded >= op.end:
            return set()
        self._count("failed_loads", 1)
        first, last = max(loaded, op.start) // self.block_size, (op.end - 1) // self.block_size
        return set(op.block_ids[first:last + 1])

    def _copy_in(self, op: TransferOp, spans: list[ChunkSpan], after: Any,
                 streams: LoadStreams, background: bool) -> int:
        """The load's copies through a ``LoadPipeline``; the end of the positions loaded."""
        pipeline = LoadPipeline(self.staging, self._views, streams,
                                self._host_slots(op.block_ids, op.start, op.end), after)
        try:
            def copy(span: ChunkSpan, lease: ChunkLease) -> None:
                lo, hi = max(span.start, op.start), min(span.end, op.end)
                pipeline.push(lease, lo - span.start, hi - span.start, lo - op.start)
            loaded = min(self.engine.retrieve_spans(spans, copy), op.end)
        finally:
            pipeline.finish()
        if background:
            streams.scatter.synchronize()  # the blocks hold the KV before vLLM is told
        else:
            self._order.wait_on_current(pipeline.last)  # the forward pass waits on the device
        return loaded

    def _count_load(self, op: TransferOp, spans: list[ChunkSpan], found: dict[int, str],
                    loaded: int, began: float) -> None:
        if self.rank != 0:  # every rank loads the same tokens: counted once
            return
        self._count("loaded_tokens", max(loaded - op.start, 0))
        self._count("load_s", time.perf_counter() - began)
        size = self.engine.config.chunk_size
        for span in spans:  # by the tier each chunk was found in at the lookup
            tokens = min(span.end, loaded) - max(span.start, op.start)
            if tokens > 0:
                self._count(f"loaded_tokens.{found.get(span.start // size, 'unknown')}", tokens)

    def load_in_background(self, op: TransferOp) -> None:
        """Queue ``op`` (a load into blocks nothing else uses until it is done) on the loader
        thread; ``take_background_loads`` reports it once done, failed blocks included. Its
        copies wait (on the device) for everything vLLM's current stream has queued now: a
        forward pass still using blocks this load reuses finishes first."""
        planned = self._order.mark()
        self.loader.submit(lambda: self._background_load(op, planned))

    def _background_load(self, op: TransferOp, planned: Any) -> None:
        failed: set[int] = set(op.block_ids)  # if even the load's own handling fails
        try:
            failed = self._load(op, planned, background=True)
        finally:
            with self._loaded_lock:
                self._loaded.add(op.req_id)
                self._loaded_failed_blocks.update(failed)

    def take_background_loads(self) -> tuple[set[str], set[int]]:
        """The requests whose background loads finished since the last call, and the blocks
        those loads could not fill (vLLM recomputes them)."""
        with self._loaded_lock:
            done, self._loaded = self._loaded, set()
            failed, self._loaded_failed_blocks = self._loaded_failed_blocks, set()
        return done, failed

    def save(self, op: TransferOp) -> None:
        """Store the request's chunks in [start, end) that the engine lacks (gathering only
        those: a chunk before them that is evicted meanwhile is skipped, never stored from
        memory nobody wrote). A chunked prefill saves each step's new whole chunks in that
        step (``start`` > 0). The KV is copied out of the blocks now; the tiers' writes run on
        the saver thread. With a session, the saver then pins the chunks [0, end) the engine
        holds for it (see ``worker_sessions``). A failure is logged and counted, never raised."""
        began, self._moved = time.perf_counter(), True
        try:
            spans = [s for s in self.engine.spans_of(op.digests, op.num_tokens)
                     if s.end <= op.end]
            self._save([s for s in spans if s.start >= op.start], op.block_ids)
            if op.session is not None and self.sessions is not None:
                session, sessions = op.session, self.sessions
                self.saver.submit(lambda: sessions.extend(session, spans))  # after the stores
        except Exception:
            self._save_failed()
            log.exception("lmcache-ext: save of request %s failed (skipped)", op.req_id)
            return
        if self.rank == 0:
            self._count("save_s", time.perf_counter() - began)  # the step's share only

    def _save(self, spans: list[ChunkSpan], block_ids: list[int]) -> None:
        """Gather each chunk the engine lacks into a staging buffer (waiting a bounded time for
        one if all are in flight) and queue its store on the saver thread, which gives the
        buffer back. The slots go to the device once, without a host wait."""
        todo = spans[self.engine.storage.prefix_length([s.key for s in spans]):]
        if not todo:
            return
        base = todo[0].start
        host = self._host_slots(block_ids, base, todo[-1].end)
        slots = host.to(self._views[0].k.device, non_blocking=True)
        for span in todo:
            buffer = self.staging.acquire()
            part = buffer[:, :, :span.num_tokens]  # [layers, 2, tokens, kv_heads, head_dim]
            try:
                at = slice(span.start - base, span.end - base)
                kernels.gather(self._views, slots[at], part, host_slots=host[at])
            except Exception:
                self.staging.release(buffer)
                raise
            gathered = self._order.mark()  # the saver's copy waits for the gather, on its stream
            self.saver.submit(self._store_job(span, buffer, part, gathered))

    def _store_job(self, span: ChunkSpan, buffer: torch.Tensor, part: torch.Tensor,
                   gathered: Any) -> Callable[[], None]:
        queued = time.perf_counter()

        def store() -> None:
            used = None
            try:  # on a GPU the tier's put is the one device-to-host copy
                with self._save_stream.run(gathered):
                    stored = self.engine.store_spans([span], part, span.start)
                    used = self._save_stream.mark()
            finally:
                self.staging.release(buffer, used)
            if self.rank == 0:
                self._count("stored_tokens", stored)
                self._count("store_s", time.perf_counter() - queued)
        return store

    def _save_failed(self) -> None:
        with self._stats_lock:
            self.save_failures += 1
            self.stats.add("failed_saves", 1)

    def _count(self, name: str, value: float) -> None:
        with self._stats_lock:
            self.stats.add(name, value)

    def _gauge(self, name: str, value: float) -> None:
        with self._stats_lock:
            self.stats.set_gauge(name, value)

    # -------------------------------------------------------------- figures for vLLM

    def take_stats(self) -> LMCacheExtStats | None:
        """This rank's figures since the last call (None if there are none): loads, saves,
        forward passes, and the tiers' events and usage (after a step that moved KV, else at
        most every ``TIER_SAMPLE_S``: reading them costs a registry scan)."""
        tokens, seconds = self.timer.take()
        self._count("forward_tokens", tokens)
        self._count("forward_s", seconds)
        now = time.monotonic()
        if self._moved or now - self._tier_sampled >= TIER_SAMPLE_S:
            self._tier_sampled, self._moved = now, False
            self._sample_tiers()
        with self._stats_lock:
            if self.stats.is_empty():
                return None
            stats, self.stats = self.stats, LMCacheExtStats()
        return stats

    def _sample_tiers(self) -> None:
        metrics, layout = self.engine.metrics, self.engine.layout
        token_bytes = math.prod(layout.shape(1)) * layout.dtype.itemsize
        for tier in self.engine.storage.tiers:
            self._gauge(f"used_bytes.{tier.name}.r{self.rank}", tier.usage().used_bytes)
            names = [(e, f"tier_{e}_total", 1.0) for e in TIER_EVENTS]
            if self.rank == 0:  # tokens: counted once (every rank holds the same ones)
                names.append(("stored_tokens", "tier_stored_bytes_total", 1 / token_bytes))
            for name, sample, scale in names:
                total = metrics.value(sample, tier=tier.name)
                key = f"{name}.{tier.name}"
                delta = total - self._tier_totals.get(key, 0.0)
                self._tier_totals[key] = total
                self._count(key, round(delta * scale))

    def _host_slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """The paged-cache slot of each position in [start, end): int64 on the host, pinned
        where the KV is on a GPU (its copy there then needs no host wait), built once per
        transfer. Raises ValueError if a position's block is missing or past the cache."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_ids, dtype=torch.int64)
        index = positions // self.block_size
        if end > start and int(index[-1]) >= len(block_ids):
            raise ValueError(f"positions up to {end} need {int(index[-1]) + 1} blocks, the "
                             f"transfer names {len(block_ids)}")
        slots = blocks[index] * self.block_size + positions % self.block_size
        if slots.numel() and not 0 <= int(slots.min()) <= int(slots.max()) < \
                self._views[0].num_slots:
            raise ValueError(f"slots {int(slots.min())}..{int(slots.max())} are outside the "
                             f"cache's {self._views[0].num_slots}")
        return slots.pin_memory() if self._order.cuda else slots

    def close(self) -> None:
        """Stop answering lookups, finish the queued saves, drop every pin, let write-behinds
        finish and close the tiers. Idempotent."""
        self.server.close()
        self.loader.close()
        self.saver.close()
        with self._pins_lock:
            pins, self._pins = list(self._pins.values()), {}
        for held in pins:
            held.pin.release()
        if self.sessions is not None:
            self.sessions.close()
        self.engine.close()


def _runs(tiers: list[str]) -> tuple[tuple[str, int], ...]:
    """["cpu", "cpu", "disk"] -> (("cpu", 2), ("disk", 1))."""
    return tuple((tier, len(list(group))) for tier, group in itertools.groupby(tiers))
