"""The cache engine: ``lookup``, ``store``, ``retrieve`` and prefix pins over the tiered store.

It knows token ids, chunks and tiers, and nothing about any serving engine: adapters hand it KV
in the ``[layers, 2 (K, V), tokens, kv_heads, head_dim]`` layout and take KV back in it.
Thread-safe: any number of threads may call any method.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import closing

import numpy as np
import torch

from lmcache_ext.chunk import KVLayout
from lmcache_ext.config import EngineConfig, describe
from lmcache_ext.keys import ChunkKey, ChunkSpan, KeyNamespace, PrefixHasher
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage import (
    Chunk,
    ChunkLease,
    CPUTier,
    StorageTier,
    TieredStore,
    build_tiers,
)
from lmcache_ext.storage.auth import integrity_notes
from lmcache_ext.units import GIB

log = logging.getLogger(__name__)
Tokens = Sequence[int] | np.ndarray | torch.Tensor


class PrefixPin:
    """Holds a prefix's chunks in the fast tier until ``release()`` (or the ``with`` block ends).

    Pinned chunks cannot be evicted and count against the budget: release pins you no longer need
    (a pin never released makes the cache stop storing once pins fill the budget).
    """

    def __init__(self, leases: list[ChunkLease], num_tokens: int, num_chunks: int | None = None):
        """``num_chunks``: the chunks the pin covers (default: one per lease; more where chunks
        in slower tiers are counted without a lease, see ``CacheEngine.pin_in_place``)."""
        self._leases = leases
        self.num_tokens = num_tokens
        self.num_chunks = len(leases) if num_chunks is None else num_chunks

    def release(self) -> None:
        leases, self._leases = self._leases, []
        for lease in leases:
            lease.release()

    def __enter__(self) -> PrefixPin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def key_namespace(config: EngineConfig, layout: KVLayout, model_name: str | None,
                  tp_rank: int = 0, tp_world_size: int = 1) -> KeyNamespace:
    """The key namespace of one rank of one model (``config.model_name`` overrides the
    adapter's name). A scheduler that hashes for every rank builds rank 0's."""
    model = config.model_name or model_name
    if not model:
        raise ValueError("a model name is needed for the key namespace (set model_name)")
    return KeyNamespace(
        model_name=model, num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim, dtype=str(layout.dtype).removeprefix("torch."),
        chunk_size=config.chunk_size, tp_rank=tp_rank, tp_world_size=tp_world_size,
        salt=config.cache_salt or "", hash_algorithm=config.pre_caching_hash_algorithm)


def _as_numpy_tokens(tokens: Tokens) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().numpy()
    return np.asarray(tokens)


class CacheEngine:
    """KV cache for token prefixes across the configured tiers."""

    def __init__(self, config: EngineConfig, layout: KVLayout, model_name: str | None = None,
                 tp_rank: int = 0, tp_world_size: int = 1,
                 tiers: Sequence[StorageTier] | None = None,
                 metrics: EngineMetrics | None = None):
        """``model_name`` identifies the model in the key namespace (``config.model_name``
        overrides it). ``tiers`` replaces the configured ones (tests, benchmarks)."""
        self.config = config
        self.layout = layout
        self.namespace = key_namespace(config, layout, model_name, tp_rank, tp_world_size)
        self.hasher = PrefixHasher(self.namespace, config.save_unfull_chunk)
        self.metrics = metrics or EngineMetrics()
        tiers = list(tiers) if tiers is not None else build_tiers(config, self.metrics,
                                                                 self.namespace.id)
        self.storage = TieredStore(tiers, self.metrics, config.write_behind_queue_chunks)
        for tier in tiers:
            usage = tier.usage()
            self.metrics.watch_usage(tier.name, lambda t=tier: t.usage().used_bytes,
                                     usage.capacity_bytes)
        self._log_start()

    def _log_start(self) -> None:
        log.info("lmcache-ext engine for %s, namespace %s (layout %s)", self.namespace.model_name,
                 self.namespace.id, self.layout)
        for line in describe(self.config):
            log.info("  %s", line)
        for tier in self.storage.tiers:
            log.info("  tier %s: %.2f GiB", tier.name, tier.usage().capacity_bytes / GIB)
        for warning, text in integrity_notes(self.config):
            log.log(logging.WARNING if warning else logging.INFO, "  %s", text)

    # ------------------------------------------------------------------ the API

    def spans(self, tokens: Tokens, salt: str = "") -> list[ChunkSpan]:
        """The chunk spans (keys and token ranges) of a prompt. Every method takes ``salt``:
        requests whose KV differs for the same tokens (LoRA, per-request cache salt) pass
        different salts and never share chunks."""
        return self.hasher.spans(_as_numpy_tokens(tokens), salt)

    def spans_of(self, digests: Sequence[bytes], num_tokens: int) -> list[ChunkSpan]:
        """This engine's spans for chunk digests hashed elsewhere (``PrefixHasher.digests`` of
        any rank of this model), over a prompt of ``num_tokens`` tokens."""
        return self.hasher.spans_of(digests, num_tokens)

    def lookup(self, tokens: Tokens, salt: str = "") -> int:
        """How many leading tokens of ``tokens`` the cache holds (a multiple of chunks)."""
        return self.lookup_spans(self.spans(tokens, salt), len(tokens))

    def peek(self, tokens: Tokens, salt: str = "") -> int:
        """``lookup`` without side effects: how many leading tokens the tiers hold now, not
        counted in the lookup metrics, nothing promoted, read or touched (a probe for a caller
        that only asks, e.g. a client deciding whether a document needs warming). A chunk still
        being written behind to a slower tier counts where it already is."""
        spans = self.spans(tokens, salt)
        held = self.storage.prefix_length([s.key for s in spans])
        return spans[held - 1].end if held else 0

    def lookup_spans(self, spans: Sequence[ChunkSpan], num_tokens: int | None = None) -> int:
        """``lookup`` for spans computed once by the caller; ``num_tokens`` (the prompt's
        length, for the hit-rate metrics) defaults to the spans' end."""
        tiers = self.locate_spans(spans, num_tokens)
        return spans[len(tiers) - 1].end if tiers else 0

    def locate_spans(self, spans: Sequence[ChunkSpan], num_tokens: int | None = None) -> \
            list[str]:
        """The fastest tier holding each cached leading span (``locate`` for spans computed
        once by the caller); counts the lookup."""
        tiers = self.storage.locate([s.key for s in spans])
        self.metrics.lookups.inc()
        self.metrics.requested_tokens.inc(num_tokens if num_tokens is not None
                                          else (spans[-1].end if spans else 0))
        self.metrics.hit_tokens.inc(spans[len(tiers) - 1].end if tiers else 0)
        return tiers

    def retrieve(self, tokens: Tokens, dest: torch.Tensor, salt: str = "") -> int:
        """Copy the cached prefix of ``tokens`` into ``dest[:, :, :n]``; return ``n``.

        ``dest`` is ``layout.shape(T)`` with T >= the tokens wanted; chunks past T are not read.
        Stops at the first chunk missing or corrupt in every tier (later chunks are useless
        without it); what was copied up to there is valid.
        """
        self._check_kv(dest, "dest")
        spans = [s for s in self.spans(tokens, salt) if s.end <= dest.shape[2]]

        def copy(span: ChunkSpan, lease: ChunkLease) -> None:
            dest[:, :, span.start:span.end].copy_(lease.chunk.kv)
        return self.retrieve_spans(spans, copy)

    def retrieve_spans(self, spans: Sequence[ChunkSpan],
                       copy: Callable[[ChunkSpan, ChunkLease], None],
                       decoded: bool = True) -> int:
        """Hand each leading cached chunk of ``spans`` (consecutive, in order) to ``copy(span,
        lease)`` (``lease.chunk.kv``: ``layout.shape(span.num_tokens)``). The lease is released
        when ``copy`` returns, unless ``copy`` took it (``lease.hand_over()``, e.g. to keep the
        chunk until an asynchronous copy out of it completes). Stops at the first chunk missing
        or corrupt in every tier, or the first ``copy`` that raises (the exception propagates).
        Returns the end of the last chunk handed over (``spans[0].start`` if none): what was
        copied up to there is valid. Chunks in slower tiers are read ahead in parallel;
        ``copy`` sees them in order. ``decoded=False``: a chunk a tier stores encoded reaches
        ``copy`` undecoded (``lease.chunk.coded``; ``kv`` still decodes it)."""
        done = spans[0].start if spans else 0
        with self.metrics.retrieve_seconds.time():
            with closing(self.storage.get_prefix([s.key for s in spans], decoded)) as leases:
                for span, lease in zip(spans, leases, strict=False):  # leases stop at a miss
                    with lease:
                        copy(span, lease)
                    done = span.end
            self.storage.touch([s.key for s in spans if s.end <= done])
        self.metrics.retrieved_tokens.inc(done - (spans[0].start if spans else 0))
        return done

    def store(self, tokens: Tokens, kv: torch.Tensor, start: int = 0, salt: str = "") -> int:
        """Store the chunks of ``tokens`` whose KV is in ``kv`` and that the cache does not hold.

        ``kv`` is ``layout.shape(T)`` and holds tokens [start, start + T) (``start`` lets a caller
        that loaded a prefix pass only the KV it computed). Returns the tokens newly stored.
        Never raises for a full cache: chunks that find no room are skipped and counted."""
        return self.store_spans(self.spans(tokens, salt), kv, start)

    def store_spans(self, spans: Sequence[ChunkSpan], kv: torch.Tensor, start: int = 0) -> int:
        """``store`` for spans computed once by the caller: stores the spans that lie within
        [start, start + T) of ``kv`` (``layout.shape(T)``) and that the cache does not hold."""
        self._check_kv(kv, "kv")
        with self.metrics.store_seconds.time():
            end = start + kv.shape[2]
            spans = [s for s in spans if s.start >= start and s.end <= end]
            keys = [s.key for s in spans]
            present = self.storage.prefix_length(keys)
            stored = 0
            for span in spans[present:]:
                piece = kv[:, :, span.start - start:span.end - start]
                if self.storage.put(span.key, Chunk(piece)):
                    stored += span.num_tokens
            self.storage.touch(keys)
        self.metrics.stored_tokens.inc(stored)
        return stored

    def locate(self, tokens: Tokens, salt: str = "") -> list[str]:
        """For each chunk of the cached prefix of ``tokens``, the fastest tier holding it (a
        lookup that also says where: counted as one)."""
        return self.locate_spans(self.spans(tokens, salt), len(tokens))

    def read_speeds(self) -> dict[str, float]:
        """Each tier's measured read speed in bytes/s (see ``probe_read_speeds``)."""
        return self.storage.read_speeds()

    def probe_read_speeds(self, kv: torch.Tensor | None = None,
                          load: Callable[[ChunkLease], None] | None = None) -> dict[str, float]:
        """Time a load of one full chunk from every tier, to seed ``read_speeds``.

        ``load(lease)`` is what a load does with a chunk read from a tier and must return once
        it is done (the vLLM worker: host-to-device copy and scatter into its registered KV
        caches, ``kv`` being what those caches hold, so the probe writes it back unchanged); by
        default a copy into host memory (the built-in engine's load). Each tier is read twice
        and the second read timed: the first pays one-off page faults that would make a fast
        tier look several times slower than it serves. The probe chunk is removed afterwards.
        """
        if kv is None:
            kv = torch.randn(self.layout.shape(self.config.chunk_size)).to(self.layout.dtype)
        if load is None:
            dest = torch.empty_like(kv)

            def load(lease: ChunkLease) -> None:
                dest.copy_(lease.chunk.kv)
        key = ChunkKey(self.namespace.id, hashlib.sha256(f"probe-{os.getpid()}".encode()).digest())
        for tier in self.storage.tiers:
            if not tier.put(key, Chunk(kv)):
                continue
            for timed in (False, True):  # the first read only faults the pages in
                began = time.perf_counter()
                lease = tier.get(key)
                if lease is None:
                    break
                with lease:
                    load(lease)
                if timed:
                    self.storage.observe_read(tier.name, kv.nbytes, time.perf_counter() - began)
            tier.remove(key)
        speeds = self.read_speeds()
        for name, speed in speeds.items():
            log.info("  tier %s loads at %.2f GB/s (probe)", name, speed / 1e9)
        return speeds

    def pin(self, tokens: Tokens, salt: str = "") -> PrefixPin:
        """Hold the cached prefix of ``tokens`` in the fast tier (see ``PrefixPin``)."""
        return self.pin_spans(self.spans(tokens, salt))

    def pin_spans(self, spans: Sequence[ChunkSpan]) -> PrefixPin:
        """Hold the leading cached chunks of ``spans`` in the fast tier (a slower tier's chunk
        is read and promoted now). The pin's ``num_tokens`` is the end of the last one held."""
        with closing(self.storage.get_prefix([s.key for s in spans])) as found:
            leases = list(found)  # slower tiers' chunks are read a few at a time, in parallel
        end = spans[len(leases) - 1].end if leases else (spans[0].start if spans else 0)
        return PrefixPin(leases, end)

    def pin_in_place(self, spans: Sequence[ChunkSpan], tiers: Sequence[str]) -> PrefixPin:
        """Hold the leading chunks of ``spans`` where they are, reading none (a lookup's pin,
        which must answer at once). ``tiers[i]``: the tier ``locate_spans`` found span i in. A
        chunk in the CPU tier is leased there (not evictable until released: a memory lease,
        no copy); a chunk in a slower tier is counted and left there for the load to read (if
        it is gone by then, that load fails from there and is recomputed). Stops at the first
        CPU chunk evicted since it was located."""
        fast = self.storage.tiers[0]
        leases: list[ChunkLease] = []
        count = 0
        for span, tier in zip(spans, tiers, strict=False):
            if tier == fast.name and isinstance(fast, CPUTier):
                lease = fast.get(span.key)
                if lease is None:
                    break
                leases.append(lease)
            count += 1
        end = spans[count - 1].end if count else (spans[0].start if spans else 0)
        return PrefixPin(leases, end, count)

    def flush(self) -> None:
        """Wait for write-behinds to reach the slower tiers."""
        self.storage.flush()

    def close(self, discard_queued: bool = False) -> None:
        """Close the tiers; ``discard_queued``: drop write-behinds not yet written (counted)
        instead of waiting for them."""
        self.storage.close(discard_queued)

    def _check_kv(self, kv: torch.Tensor, name: str) -> None:
        want = self.layout.shape(kv.shape[2] if kv.dim() == 5 else -1)
        if tuple(kv.shape) != want or kv.dtype != self.layout.dtype:
            raise ValueError(f"{name} must be {self.layout.dtype} of shape {want} "
                             f"[layers, 2, tokens, kv_heads, head_dim], got {kv.dtype} "
                             f"{tuple(kv.shape)}")
