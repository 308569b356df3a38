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

import logging
import threading
from typing import Any

import torch

from lmcache_ext import kernels
from lmcache_ext.adapters import vllm_compat
from lmcache_ext.adapters.vllm_metadata import TransferOp
from lmcache_ext.adapters.worker_channel import CacheServer, LookupRequest
from lmcache_ext.adapters.worker_sessions import WorkerSessions
from lmcache_ext.chunk import KVLayout
from lmcache_ext.engine import CacheEngine, PrefixPin
from lmcache_ext.keys import ChunkSpan

log = logging.getLogger(__name__)


class WorkerSide:
    """One rank's cache and KV mover. ``load``/``save`` run on vLLM's model-runner thread;
    ``lookup``/``release`` on the channel's thread (or the scheduler's, in-process)."""

    def __init__(self, engine: CacheEngine, block_size: int, engine_key: str, rank: int):
        self.engine = engine
        self.block_size = block_size
        self.rank = rank
        self._views: list[kernels.PagedKV] = []
        self._pins: dict[str, tuple[int, PrefixPin]] = {}  # req_id -> (pin id, pin)
        self._pins_lock = threading.Lock()
        self.save_failures = 0  # saves that raised: logged, counted, never passed on
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
        found = KVLayout(len(caches), layout.num_kv_heads, layout.head_dim, self._views[0].k.dtype)
        if found != layout:
            raise kernels.UnsupportedLayout(f"vLLM's KV caches are {found}, its KV cache "
                                            f"config says {layout}")
        log.info("lmcache-ext rank %d: %d KV cache layers, backend %s, %s layout, block size %d",
                 self.rank, len(caches), backend, paged.value, self._views[0].block_size)

    # -------------------------------------------------------------- the scheduler's questions

    def lookup(self, request: LookupRequest) -> int:
        """Chunks of the prompt held from the first; pins chunks [first, held) for the request
        (replacing its earlier pin). A chunk evicted between the count and the pin ends the
        run there: the answer never counts a chunk that is not pinned."""
        if self.sessions is not None:
            self.sessions.expire()
        spans = self.engine.spans_of(request.digests, request.num_tokens)
        hit = self.engine.lookup_spans(spans, request.num_tokens)
        held = sum(1 for s in spans if s.end <= hit)
        pin = None
        if held > request.first:
            pin = self.engine.pin_spans(spans[request.first:held])
            held = request.first + pin.num_chunks
        with self._pins_lock:
            old = self._pins.pop(request.req_id, None)
            if pin is not None:
                self._pins[request.req_id] = (request.pin_id, pin)
        if old is not None:
            old[1].release()  # after the new pin: chunks in both are never unpinned between
        return held

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
        try:
            slots = self._slots(op.block_ids, op.start, op.end)
            device = self._views[0].k.device

            def copy(span: ChunkSpan, kv: torch.Tensor) -> None:
                # kv: [layers, 2, span tokens, H, D] in the tier's buffer, held while we copy
                lo, hi = max(span.start, op.start), min(span.end, op.end)
                part = kv[:, :, lo - span.start:hi - span.start]
                kernels.scatter(part.to(device), self._views, slots[lo - op.start:hi - op.start])
            loaded = min(self.engine.retrieve_spans(spans, copy), op.end)
        except Exception:
            log.exception("lmcache-ext: load of request %s failed; it will be recomputed",
                          op.req_id)
            loaded = op.start
        finally:
            self.release(op.req_id, op.pin_id)
        if loaded >= op.end:
            return set()
        first, last = max(loaded, op.start) // self.block_size, (op.end - 1) // self.block_size
        return set(op.block_ids[first:last + 1])

    def save(self, op: TransferOp) -> None:
        """Store the request's chunks in [0, end) that the engine lacks (gathering only those:
        a chunk before them that is evicted meanwhile is skipped, never stored from memory
        nobody wrote). A failure is logged and counted. With a session, the session then pins
        the chunks [0, end) that the engine holds (see ``worker_sessions``)."""
        try:
            spans = [s for s in self.engine.spans_of(op.digests, op.num_tokens)
                     if s.end <= op.end]
            self._save(op, spans)
            if op.session is not None and self.sessions is not None:
                self.sessions.extend(op.session, spans)
        except Exception:
            self.save_failures += 1
            log.exception("lmcache-ext: save of request %s failed (skipped)", op.req_id)

    def _save(self, op: TransferOp, spans: list[ChunkSpan]) -> None:
        present = self.engine.storage.prefix_length([s.key for s in spans])
        start = spans[present - 1].end if present else 0
        if start >= op.end:
            return  # the engine has every chunk already: copy nothing
        layout = self.engine.layout
        device = self._views[0].k.device
        buf = torch.empty(layout.shape(op.end - start), dtype=layout.dtype, device=device)
        kernels.gather(self._views, self._slots(op.block_ids, start, op.end).to(device), buf)
        self.engine.store_spans(spans, buf.cpu(), start)

    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """The paged-cache slot of each position in [start, end) (int64, on the KV's device)."""
        positions = torch.arange(start, end)
        blocks = torch.tensor(block_ids, dtype=torch.int64)
        slots = blocks[positions // self.block_size] * self.block_size + \
            positions % self.block_size
        return slots.to(self._views[0].k.device)

    def close(self) -> None:
        """Stop answering lookups, drop every pin, let write-behinds finish and close the
        tiers. Idempotent."""
        self.server.close()
        with self._pins_lock:
            pins, self._pins = list(self._pins.values()), {}
        for _, pin in pins:
            pin.release()
        if self.sessions is not None:
            self.sessions.close()
        self.engine.close()
