"""The connector's worker side: one per tensor-parallel rank, in the process that holds the KV.

It owns the rank's ``CacheEngine`` (its tiers live here, beside the KV they copy), answers the
scheduler's lookups (``worker_channel.CacheService``: count the held chunks, pin them until the
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
from typing import Any

import torch

from lmcache_ext import kernels
from lmcache_ext.adapters import vllm_compat
from lmcache_ext.adapters.background import BackgroundJobs
from lmcache_ext.adapters.staging import StagingArea
from lmcache_ext.adapters.vllm_metadata import TransferOp
from lmcache_ext.adapters.vllm_stats import TIER_EVENTS, LMCacheExtStats
from lmcache_ext.adapters.worker_channel import CacheServer, LookupRequest, RankAnswer
from lmcache_ext.adapters.worker_sessions import WorkerSessions
from lmcache_ext.chunk import KVLayout
from lmcache_ext.engine import CacheEngine, PrefixPin
from lmcache_ext.keys import ChunkSpan

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


class WorkerSide:
    """One rank's cache and KV mover. ``load``/``save`` run on vLLM's model-runner thread;
    ``lookup``/``release`` on the channel's thread (or the scheduler's, in-process)."""

    def __init__(self, engine: CacheEngine, block_size: int, engine_key: str, rank: int):
        self.engine = engine
        self.block_size = block_size
        self.rank = rank
        self._views: list[kernels.PagedKV] = []
        # req_id -> (pin id, pin, {chunk index: the tier it was found in})
        self._pins: dict[str, tuple[int, PrefixPin, dict[int, str]]] = {}
        self._pins_lock = threading.Lock()
        self.save_failures = 0  # saves that raised: logged, counted, never passed on
        self.stats = LMCacheExtStats()  # this rank's figures since vLLM last took them
        self._stats_lock = threading.Lock()  # the saver thread counts too
        self._stream: Any = None  # the saver's CUDA stream (GPU only)
        self.timer = ForwardTimer(torch.device("cpu"), engine.config.chunk_size)
        self._tier_totals: dict[str, float] = {}
        self._tier_sampled = 0.0
        self._moved = False  # a load or save since the tiers were last sampled
        engine.probe_read_speeds()  # the cost model needs every tier's speed from the start
        self._sample_tiers()  # the baseline (the probe's writes are not the service's)
        self.stats.reset()
        self.saver = BackgroundJobs(f"lmcache-ext-save-r{rank}", MAX_PENDING_SAVES,
                                    self._save_failed)
        # Background loads: each holds only its pin, so the queue is as long as vLLM's batch.
        self.loader = BackgroundJobs(f"lmcache-ext-load-r{rank}", MAX_PENDING_LOADS,
                                     lambda: None)
        self._load_stream: Any = None  # the loader's CUDA stream (GPU only)
        self._loaded: set[str] = set()  # background loads done, not reported to vLLM yet
        self._loaded_failed_blocks: set[int] = set()  # the blocks those could not fill
        self._loaded_lock = threading.Lock()
        # how long a lookup waits for saves in flight: well inside the scheduler's deadline
        self.save_wait_s = engine.config.worker_lookup_timeout_s / 4
        config = engine.config
        self.sessions = (WorkerSessions(engine, config.sessions_expiration_s)
                         if config.enable_stateful_sessions else None)
        self.server = CacheServer(engine_key, rank, self)

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
        self.timer = ForwardTimer(self._views[0].k.device, self.engine.config.chunk_size)
        self.staging = StagingArea(layout, self.engine.config.chunk_size, self._views[0].k.device,
                                   self.engine.config.staging_chunks)
        found = KVLayout(len(caches), layout.num_kv_heads, layout.head_dim, self._views[0].k.dtype)
        if found != layout:
            raise kernels.UnsupportedLayout(f"vLLM's KV caches are {found}, its KV cache "
                                            f"config says {layout}")
        log.info("lmcache-ext rank %d: %d KV cache layers, backend %s, %s layout, block size %d",
                 self.rank, len(caches), backend, paged.value, self._views[0].block_size)

    # -------------------------------------------------------------- the scheduler's questions

    def lookup(self, request: LookupRequest) -> RankAnswer:
        """Chunks of the prompt held from the first, the tier of each and the tiers' read
        times; pins chunks [first, held) for the request (replacing its earlier pin). A chunk
        evicted between the count and the pin ends the run there: the answer never counts a
        chunk that is not pinned."""
        # A save still being written would be a miss: give the saver a moment (it is idle,
        # and this free, unless it is backlogged).
        self.saver.wait_idle(self.save_wait_s)
        if self.sessions is not None:
            self.sessions.expire()
        spans = self.engine.spans_of(request.digests, request.num_tokens)
        tiers = self.engine.locate_spans(spans, request.num_tokens)
        held = len(tiers)
        pin = None
        if held > request.first:
            pin = self.engine.pin_spans(spans[request.first:held])
            held = request.first + pin.num_chunks
        with self._pins_lock:
            old = self._pins.pop(request.req_id, None)
            if pin is not None:
                found = {request.first + i: tier
                         for i, tier in enumerate(tiers[request.first:held])}
                self._pins[request.req_id] = (request.pin_id, pin, found)
        if old is not None:
            old[1].release()  # after the new pin: chunks in both are never unpinned between
        return RankAnswer(held, _runs(tiers[:held]), self.chunk_read_s())

    def chunk_read_s(self) -> dict[str, float]:
        """Seconds to read one full chunk from each tier measured so far."""
        layout, tokens = self.engine.layout, self.engine.config.chunk_size
        nbytes = math.prod(layout.shape(tokens)) * layout.dtype.itemsize
        return {tier: nbytes / speed for tier, speed in self.engine.read_speeds().items()}

    def release(self, req_id: str, pin_id: int) -> None:
        with self._pins_lock:
            entry = self._pins.get(req_id)
            if entry is None or entry[0] != pin_id:
                return  # already released, or a newer lookup re-pinned the request
            del self._pins[req_id]
        entry[1].release()

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
        """Copy positions [start, end) of the request's cached chunks into its blocks; the
        block ids whose positions could not be loaded (vLLM recomputes them)."""
        spans = [s for s in self.engine.spans_of(op.digests, op.num_tokens)
                 if s.end > op.start and s.start < op.end]
        loaded = op.start
        began, self._moved = time.perf_counter(), True
        with self._pins_lock:
            entry = self._pins.get(op.req_id)
        found = entry[2] if entry is not None and entry[0] == op.pin_id else {}
        try:
            slots = self._slots(op.block_ids, op.start, op.end)
            device = self._views[0].k.device

            def copy(span: ChunkSpan, kv: torch.Tensor) -> None:
                # kv: [layers, 2, span tokens, H, D] in the tier's buffer, held while we copy
                lo, hi = max(span.start, op.start), min(span.end, op.end)
                part = kv[:, :, lo - span.start:hi - span.start]
                where = slots[lo - op.start:hi - op.start]
                if part.device == device:  # CPU: scatter straight from the tier's buffer
                    kernels.scatter(part, self._views, where)
                    return
                buffer = self.staging.acquire()  # GPU: one host-to-device hop per chunk
                staged = buffer[:, :, :hi - lo]
                staged.copy_(part)
                kernels.scatter(staged, self._views, where)
                used = torch.cuda.Event()
                used.record()
                self.staging.release(buffer, used)
            loaded = min(self.engine.retrieve_spans(spans, copy), op.end)
        except Exception:
            log.exception("lmcache-ext: load of request %s failed; it will be recomputed",
                          op.req_id)
            loaded = op.start
        finally:
            self.release(op.req_id, op.pin_id)
        if self.rank == 0:  # every rank loads the same tokens: counted once
            self._count("loaded_tokens", max(loaded - op.start, 0))
            self._count("load_s", time.perf_counter() - began)
            size = self.engine.config.chunk_size
            for span in spans:  # by the tier each chunk was found in at the lookup
                tokens = min(span.end, loaded) - max(span.start, op.start)
                if tokens > 0:
                    self._count(f"loaded_tokens.{found.get(span.start // size, 'unknown')}",
                                   tokens)
        if loaded >= op.end:
            return set()
        self._count("failed_loads", 1)
        first, last = max(loaded, op.start) // self.block_size, (op.end - 1) // self.block_size
        return set(op.block_ids[first:last + 1])

    def load_in_background(self, op: TransferOp) -> None:
        """Queue ``op`` (a load into blocks nothing else uses until it is done) on the loader
        thread; ``take_background_loads`` reports it once done, failed blocks included."""
        self.loader.submit(lambda: self._background_load(op))

    def _background_load(self, op: TransferOp) -> None:
        failed: set[int] = set(op.block_ids)  # if even the load's own handling fails
        try:
            if self._views and self._views[0].k.is_cuda:
                if self._load_stream is None:
                    self._load_stream = torch.cuda.Stream(device=self._views[0].k.device)
                with torch.cuda.stream(self._load_stream):
                    failed = self.load(op)
                self._load_stream.synchronize()  # the blocks hold the KV before vLLM is told
            else:
                failed = self.load(op)
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
        """Store the request's chunks in [0, end) that the engine lacks (gathering only those:
        a chunk before them that is evicted meanwhile is skipped, never stored from memory
        nobody wrote). The KV is copied out of the blocks now; the tiers' writes run on the
        saver thread. With a session, the saver then pins the chunks [0, end) the engine holds
        for it (see ``worker_sessions``). A failure is logged and counted, never raised."""
        began, self._moved = time.perf_counter(), True
        try:
            spans = [s for s in self.engine.spans_of(op.digests, op.num_tokens)
                     if s.end <= op.end]
            self._save(op, spans)
            if op.session is not None and self.sessions is not None:
                session, sessions = op.session, self.sessions
                self.saver.submit(lambda: sessions.extend(session, spans))  # after the stores
        except Exception:
            self._save_failed()
            log.exception("lmcache-ext: save of request %s failed (skipped)", op.req_id)
            return
        if self.rank == 0:
            self._count("save_s", time.perf_counter() - began)  # the step's share only

    def _save(self, op: TransferOp, spans: list[ChunkSpan]) -> None:
        """Gather each chunk the engine lacks into a staging buffer (waiting for one if all are
        in flight) and queue its store on the saver thread, which gives the buffer back."""
        present = self.engine.storage.prefix_length([s.key for s in spans])
        device = self._views[0].k.device
        for span in spans[present:]:
            buffer = self.staging.acquire()
            part = buffer[:, :, :span.num_tokens]  # [layers, 2, tokens, kv_heads, head_dim]
            try:
                kernels.gather(self._views, self._slots(op.block_ids, span.start, span.end),
                               part)
            except Exception:
                self.staging.release(buffer)
                raise
            gathered = None
            if device.type == "cuda":  # the saver's copy waits for the gather, on its stream
                gathered = torch.cuda.Event()
                gathered.record()
            self.saver.submit(self._store_job(span, buffer, part, gathered))

    def _store_job(self, span: ChunkSpan, buffer: torch.Tensor, part: torch.Tensor,
                   gathered: Any) -> Callable[[], None]:
        queued = time.perf_counter()

        def store() -> None:
            used = None
            try:
                if gathered is None:
                    stored = self.engine.store_spans([span], part, span.start)
                else:  # GPU: the tier's put is the one device-to-host copy
                    stream = self._copy_stream()
                    stream.wait_event(gathered)
                    with torch.cuda.stream(stream):
                        stored = self.engine.store_spans([span], part, span.start)
                        used = torch.cuda.Event()
                        used.record()
            finally:
                self.staging.release(buffer, used)
            if self.rank == 0:
                self._count("stored_tokens", stored)
                self._count("store_s", time.perf_counter() - queued)
        return store

    def _copy_stream(self) -> Any:
        """The saver thread's CUDA stream for device -> host copies (made on first use)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self._views[0].k.device)
        return self._stream

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

    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """The paged-cache slot of each position in [start, end) (int64, on the KV's device)."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_ids, dtype=torch.int64)
        slots = blocks[positions // self.block_size] * self.block_size + \
            positions % self.block_size
        return slots.to(self._views[0].k.device)

    def close(self) -> None:
        """Stop answering lookups, finish the queued saves, drop every pin, let write-behinds
        finish and close the tiers. Idempotent."""
        self.server.close()
        self.loader.close()
        self.saver.close()
        with self._pins_lock:
            pins, self._pins = list(self._pins.values()), {}
        for _, pin, _ in pins:
            pin.release()
        if self.sessions is not None:
            self.sessions.close()
        self.engine.close()


def _runs(tiers: list[str]) -> tuple[tuple[str, int], ...]:
    """["cpu", "cpu", "disk"] -> (("cpu", 2), ("disk", 1))."""
    return tuple((tier, len(list(group))) for tier, group in itertools.groupby(tiers))
