"""The connector's worker side: one per tensor-parallel rank, in the process that holds the KV.

It owns the rank's ``CacheEngine`` (its tiers live here, beside the KV they copy), answers the
scheduler's lookups (``channel.RankCache``: count the held chunks, pin them until the
load), and moves bytes: a load copies each cached chunk straight from the tier's buffer into the
request's paged blocks (one copy per chunk; only the positions vLLM asked for), a save gathers the
chunks the engine lacks and stores them. A failed or short load reports its blocks as load
errors so vLLM recomputes them; a failed save is logged and counted, never raised. A save that
names a SageMaker session also keeps the saved conversation pinned for it (``sessions``)
until the session is closed (``release_session``) or expires.

Each job has its module: ``worker_pins`` (the lookups' pins), ``worker_loads`` (in the step and
in the background), ``worker_saves`` (gather in the step, store on the saver thread), over
``worker_kv`` (the registered caches, staging and streams). ``WorkerSide`` composes them, answers
the channel (``RankCache``) and hands vLLM the rank's figures.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Any

import torch

from lmcache_ext import kernels
from lmcache_ext.adapters.vllm import compat as vllm_compat
from lmcache_ext.adapters.vllm.channel import LookupRequest, RankAnswer, RankCacheServer
from lmcache_ext.adapters.vllm.sessions import WorkerSessions
from lmcache_ext.adapters.vllm.staging import StagingArea
from lmcache_ext.adapters.vllm.stats import TIER_EVENTS, LMCacheExtStats, StageClock, StatsTally
from lmcache_ext.adapters.vllm.worker_kv import RankKV
from lmcache_ext.adapters.vllm.worker_loads import RankLoads
from lmcache_ext.adapters.vllm.worker_pins import RankPins
from lmcache_ext.adapters.vllm.worker_saves import RankSaves
from lmcache_ext.chunk import KVLayout
from lmcache_ext.engine import CacheEngine

log = logging.getLogger(__name__)
TIER_SAMPLE_S = 1.0  # how often the tiers' counters and usage are read into the stats


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
    """One rank's cache and KV mover, composed of its pins (``worker_pins``), loads
    (``worker_loads``) and saves (``worker_saves``) over the registered caches
    (``worker_kv``). ``register``, the loads, the saves and ``take_stats`` run on vLLM's
    model-runner thread; ``lookup``/``release``/``release_session`` on the channel's thread
    (or the scheduler's, in-process)."""

    def __init__(self, engine: CacheEngine, block_size: int, engine_key: str, rank: int):
        self.engine = engine
        self.rank = rank
        self.kv = RankKV(block_size)
        self.tally = StatsTally()  # this rank's figures since vLLM last took them
        self.timer = ForwardTimer(torch.device("cpu"), engine.config.chunk_size)
        self._tier_totals: dict[str, float] = {}
        self._tier_sampled = 0.0
        self._levels_sent: dict[str, int] = {}  # the levels' last values sent
        config = engine.config
        self.sessions = (WorkerSessions(engine, config.sessions_expiration_s)
                         if config.enable_stateful_sessions else None)
        self.clock = StageClock()  # seconds per stage since start (benchmarks read it)
        self.pins = RankPins(engine, self.clock)
        self.loads = RankLoads(engine, self.kv, self.pins, self.tally, rank, self.clock)
        self.saves = RankSaves(engine, self.kv, self.tally, self.sessions, rank)
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
        views = kernels.paged_kv_layers(caches, paged, layout.num_kv_heads, layout.head_dim)
        kernels.prepare(views)  # on a GPU: the kernel's per-layer pointer tables, once
        device = views[0].k.device
        self.timer = ForwardTimer(device, self.engine.config.chunk_size)
        self.kv.register(views, StagingArea(layout, self.engine.config.chunk_size, device,
                                            self.engine.config.staging_chunks))
        found = KVLayout(len(caches), layout.num_kv_heads, layout.head_dim, views[0].k.dtype)
        if found != layout:
            raise kernels.UnsupportedLayout(f"vLLM's KV caches are {found}, its KV cache "
                                            f"config says {layout}")
        log.info("lmcache-ext rank %d: %d KV cache layers, backend %s, %s layout, block size %d",
                 self.rank, len(caches), backend, paged.value, views[0].block_size)
        self.loads.probe_read_speeds()  # the cost model needs every tier's load speed now
        self._sample_tiers()  # the baseline (the probe's writes are not the service's)
        self.tally.reset()

    # -------------------------------------------------------------- the scheduler's questions

    def lookup(self, request: LookupRequest) -> RankAnswer:
        """Chunks of the prompt held from the first, the tier of each and the tiers' read
        times; pins chunks [first, held) for the request (``RankPins.pin``). Answers from the
        tiers' indexes only: it never waits for the saver (a save still in flight is a miss)
        and reads no chunk (a chunk in a slower tier is read by the load)."""
        if self.sessions is not None:
            self.sessions.expire()
        tiers = self.pins.pin(request)
        return RankAnswer(len(tiers), _runs(tiers), self.chunk_read_s())

    def chunk_read_s(self) -> dict[str, float]:
        """Seconds to read one full chunk from each tier measured so far."""
        layout, tokens = self.engine.layout, self.engine.config.chunk_size
        nbytes = math.prod(layout.shape(tokens)) * layout.dtype.itemsize
        return {tier: nbytes / speed for tier, speed in self.engine.read_speeds().items()}

    def release(self, req_id: str, pin_id: int) -> None:
        self.pins.release(req_id, pin_id)

    def release_session(self, session_id: str) -> int:
        """The session was closed: unpin its conversation; the bytes freed."""
        freed = self.sessions.release(session_id) if self.sessions is not None else 0
        log.info("lmcache-ext rank %d: session %s closed, %d bytes unpinned", self.rank,
                 session_id, freed)
        return freed

    def num_pins(self) -> int:
        """Requests holding a pin on this rank (a pin that never goes is a leak)."""
        return len(self.pins)

    # -------------------------------------------------------------- figures for vLLM

    def take_stats(self) -> LMCacheExtStats | None:
        """This rank's figures since the last call (None if there are none): loads, saves,
        forward passes, and the tiers' events and usage (after a step that moved KV, else at
        most every ``TIER_SAMPLE_S``: reading them costs a registry scan)."""
        tokens, seconds = self.timer.take()
        self.tally.add("forward_tokens", tokens)
        self.tally.add("forward_s", seconds)
        self._sample_levels()
        now = time.monotonic()
        if self.tally.moved or now - self._tier_sampled >= TIER_SAMPLE_S:
            self._tier_sampled, self.tally.moved = now, False
            self._sample_tiers()
        return self.tally.take()

    def _sample_levels(self) -> None:
        """Session pins, staging buffers in use and requests holding pins (``stats.LEVELS``),
        sent when they change (a level above 0 while the engine idles is a leak)."""
        staging = self.kv.staging
        in_use = 0 if staging is None else \
            (staging.count - staging.free()) * staging.allocated_bytes // max(staging.count, 1)
        pinned = self.sessions.pins.pinned_bytes() if self.sessions is not None else 0
        for level, value in (("pinned_bytes", pinned), ("staging_bytes", in_use),
                             ("pinned_requests", len(self.pins))):
            name = f"{level}.r{self.rank}"
            if self._levels_sent.get(name) != value:
                self._levels_sent[name] = value
                self.tally.set_gauge(name, value)

    def _sample_tiers(self) -> None:
        metrics, layout = self.engine.metrics, self.engine.layout
        token_bytes = math.prod(layout.shape(1)) * layout.dtype.itemsize
        for tier in self.engine.storage.tiers:
            self.tally.set_gauge(f"used_bytes.{tier.name}.r{self.rank}", tier.usage().used_bytes)
            names = [(e, f"tier_{e}_total", 1.0) for e in TIER_EVENTS]
            if self.rank == 0:  # tokens: counted once (every rank holds the same ones)
                names.append(("stored_tokens", "tier_stored_bytes_total", 1 / token_bytes))
            for name, sample, scale in names:
                total = metrics.value(sample, tier=tier.name)
                key = f"{name}.{tier.name}"
                delta = total - self._tier_totals.get(key, 0.0)
                self._tier_totals[key] = total
                self.tally.add(key, round(delta * scale))

    def close(self) -> None:
        """Stop answering lookups, finish the queued loads and saves, drop every pin, drain the
        sessions' pinned conversations to the shared tier (``drain_timeout_s``), let
        write-behinds finish (dropped if the drain ran out of time) and close the tiers.
        Idempotent."""
        self.server.close()
        self.loads.close()
        self.saves.close()
        self.pins.release_all()
        report = None
        if self.sessions is not None:  # vLLM shuts the connector down on SIGTERM: drain first
            report = self.sessions.drain(self.engine.config.drain_timeout_s)
            self.sessions.close()
        self.engine.close(discard_queued=report is not None and not report.complete)


def _runs(tiers: list[str]) -> tuple[tuple[str, int], ...]:
    """["cpu", "cpu", "disk"] -> (("cpu", 2), ("disk", 1))."""
    return tuple((tier, len(list(group))) for tier, group in itertools.groupby(tiers))
