"""The tiered store: look up tier by tier, promote on a hit, write the fast tier first and the
slower ones behind it.

Tiers are ordered fastest first. A store goes into the first tier on the caller's thread (one
memcpy for the CPU tier) and reaches every slower tier through its own bounded write-behind queue.
A hit in a slower tier is copied up into the first tier (promotion) and written behind to the tiers
between, so the next hit is fast.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from lmcache_ext.keys import ChunkKey
from lmcache_ext.metrics import EngineMetrics, TierCounters
from lmcache_ext.storage.base import Chunk, ChunkLease, StorageTier
from lmcache_ext.storage.write_behind import WriteBehind

log = logging.getLogger(__name__)


class TieredStore:
    """Thread-safe. ``tiers`` fastest first; the store closes them on ``close()``."""

    def __init__(self, tiers: Sequence[StorageTier], metrics: EngineMetrics,
                 write_behind_queue_chunks: int = 64):
        if not tiers:
            raise ValueError("a tiered store needs at least one tier")
        self.tiers = list(tiers)
        self._counters: dict[str, TierCounters] = {t.name: metrics.for_tier(t.name) for t in tiers}
        self._behind = [
            WriteBehind(tier, self._counters[tier.name], write_behind_queue_chunks)
            for tier in self.tiers[1:]
        ]

    def prefix_length(self, keys: Sequence[ChunkKey]) -> int:
        """Longest run of ``keys`` from the first that some tier holds (tiers may alternate)."""
        found = 0
        while found < len(keys):
            step = 0
            for tier in self.tiers:
                step = tier.prefix_length(keys[found:])
                if step:
                    break
            if not step:
                break
            found += step
        return found

    def get(self, key: ChunkKey) -> ChunkLease | None:
        """A lease on the chunk from the fastest tier that has it; promotes slower hits."""
        for level, tier in enumerate(self.tiers):
            lease = tier.get(key)
            if lease is None:
                continue
            counters = self._counters[tier.name]
            counters.hits.inc()
            counters.retrieved_bytes.inc(lease.chunk.meta.nbytes)
            if level > 0:
                promoted = self._promote(key, lease.chunk, level)
                if promoted is not None:  # serve from (and pin) the fast copy
                    lease.release()
                    return promoted
            return lease
        return None

    def put(self, key: ChunkKey, chunk: Chunk) -> bool:
        """Store into the first tier now and queue it for the slower ones. False if not stored.

        If the first tier has no room it can free (everything in it is pinned, e.g. waiting for
        write-behind), the chunk is written straight through to the slower tiers on this thread
        instead of being lost: backpressure, not data loss.
        """
        if self.tiers[0].put(key, chunk):
            self._write_behind(key, range(len(self._behind)))
            return True
        stored = False
        for tier in self.tiers[1:]:
            try:
                stored = tier.put(key, chunk) or stored
            except Exception:  # a tier must not raise; if one does, the chunk is not stored there
                self._counters[tier.name].errors.inc()
                log.exception("write-through to the %s tier failed", tier.name)
        return stored

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        """``keys`` were just used as one prefix: keep them, the first longest, in fast tiers."""
        self.tiers[0].touch(keys)

    def flush(self) -> None:
        """Wait until every queued write-behind has reached its tier."""
        for behind in self._behind:
            behind.flush()

    def close(self) -> None:
        for behind in self._behind:
            behind.close()
        for tier in self.tiers:
            tier.close()

    def _promote(self, key: ChunkKey, chunk: Chunk, level: int) -> ChunkLease | None:
        """Copy a chunk found at ``level`` into the first tier; a lease on that copy, or None."""
        if not self.tiers[0].put(key, chunk):
            return None
        self._counters[self.tiers[level].name].promoted.inc()
        # The tiers between the first and the one that had it (queues 0 .. level-2).
        self._write_behind(key, range(level - 1))
        return self.tiers[0].get(key)

    def _write_behind(self, key: ChunkKey, queues: range) -> None:
        for index in queues:
            lease = self.tiers[0].get(key)
            if lease is None:  # evicted already (everything else pinned): nothing to copy from
                return
            self._behind[index].submit(key, lease)
