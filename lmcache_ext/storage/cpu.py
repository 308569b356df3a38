"""CPU RAM tier: a byte budget that is never exceeded, LRU eviction, pins for chunks in use.

A chunk being written (between reserve and the end of the copy) or read (while a lease is held)
cannot be evicted. The copy itself runs outside the lock, so writers of different chunks copy in
parallel. Chunks live as raw KV in slices of one slab of exactly the budget, allocated (and with a
GPU pinned) when the tier is made, never under the lock (``buffer_pool``, ``pinned``): no header,
no checksum, since process memory is not subject to the corruption a file or a network value
is, and a store stays one memcpy (on a GPU host, a device-to-host copy into pinned memory).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmcache_ext.chunk import ChunkMeta, as_kv
from lmcache_ext.keys import ChunkKey
from lmcache_ext.metrics import EngineMetrics, TierCounters
from lmcache_ext.storage.base import Chunk, ChunkLease, StorageTier, TierUsage
from lmcache_ext.storage.buffer_pool import BufferPool

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Entry:
    buffer: torch.Tensor  # flat uint8, meta.nbytes long
    meta: ChunkMeta
    pins: int = 0
    ready: bool = False  # False while the first copy is in flight
    removed: bool = False  # out of the index; the buffer goes back when the last pin goes


class CPUTier(StorageTier):
    """The fast tier. Thread-safe; ``put`` and ``get`` never block on anything but a short lock."""

    name = "cpu"
    in_memory = True

    def __init__(self, budget_bytes: int, counters: TierCounters | None = None):
        self._pool = BufferPool(budget_bytes)
        self._index: OrderedDict[ChunkKey, _Entry] = OrderedDict()  # least recent first
        self._lock = threading.Lock()
        self._counters = counters or EngineMetrics().for_tier(self.name)

    @property
    def peak_allocated_bytes(self) -> int:
        return self._pool.peak_allocated_bytes

    def contains(self, key: ChunkKey) -> bool:
        with self._lock:
            entry = self._index.get(key)
            return entry is not None and entry.ready

    def prefix_length(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            for index, key in enumerate(keys):
                entry = self._index.get(key)
                if entry is None or not entry.ready:
                    return index
            return len(keys)

    def get(self, key: ChunkKey) -> ChunkLease | None:
        with self._lock:
            entry = self._index.get(key)
            if entry is None or not entry.ready:
                return None
            entry.pins += 1
            self._index.move_to_end(key)
        return ChunkLease(Chunk(as_kv(entry.meta, entry.buffer)), lambda: self._unpin(entry))

    def put(self, key: ChunkKey, chunk: Chunk) -> bool:
        meta = chunk.meta
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                return True
            buffer = self._reserve(meta.nbytes)
            if buffer is None:
                self._counters.rejected.inc()
                return False
            entry = _Entry(buffer, meta, pins=1)
            self._index[key] = entry
        try:
            as_kv(meta, buffer).copy_(chunk.kv)
        except Exception:
            log.exception("copy into the CPU tier failed; chunk not stored")
            self._forget(key, entry)
            self._unpin(entry)
            return False
        with self._lock:
            entry.ready = True
        self._unpin(entry)
        self._counters.stored_bytes.inc(meta.nbytes)
        return True

    def remove(self, key: ChunkKey) -> bool:
        entry = self._index.get(key)
        return entry is not None and self._forget(key, entry)

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            for key in reversed(keys):
                if key in self._index:
                    self._index.move_to_end(key)

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._pool.allocated_bytes, self._pool.budget_bytes, len(self._index))

    @property
    def slab(self) -> torch.Tensor:
        """The tier's memory: ``[budget_bytes]`` uint8, every chunk a slice of it."""
        return self._pool.slab

    def close(self) -> None:
        """Unpin the slab. Idempotent; no lease may be in use."""
        self._pool.close()

    # -------------------------------------------------------------- internals

    def _reserve(self, nbytes: int) -> torch.Tensor | None:
        """(Lock held.) A buffer for ``nbytes``, evicting least-recent unpinned chunks as needed."""
        if nbytes > self._pool.budget_bytes:
            return None
        while (buffer := self._pool.take(nbytes)) is None:
            if not self._evict_one():
                return None
        return buffer

    def _evict_one(self) -> bool:
        """(Lock held.) Evict the least recent chunk nobody holds; False if there is none."""
        for key, entry in self._index.items():
            if entry.pins == 0 and entry.ready:
                del self._index[key]
                entry.removed = True
                self._pool.give_back(entry.buffer)
                self._counters.evictions.inc()
                return True
        return False

    def _forget(self, key: ChunkKey, entry: _Entry) -> bool:
        """Take ``entry`` out of the index; its buffer returns once unpinned. False if gone."""
        with self._lock:
            if entry.removed:
                return False
            if self._index.get(key) is entry:
                del self._index[key]
            entry.removed = True
            if entry.pins == 0:
                self._pool.give_back(entry.buffer)
            return True

    def _unpin(self, entry: _Entry) -> None:
        with self._lock:
            entry.pins -= 1
            if entry.pins == 0 and entry.removed:
                self._pool.give_back(entry.buffer)
