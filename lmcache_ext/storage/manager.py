"""The tiered store: look up tier by tier, promote on a hit, write the fast tier first and the
slower ones behind it.

Tiers are ordered fastest first. A store goes into the first tier on the caller's thread (one
memcpy for the CPU tier) and reaches every slower tier through its own bounded write-behind queue.
A hit in a slower tier is copied up into the first tier (promotion) and written behind to the tiers
between, so the next hit is fast.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from lmcache_ext.config import default_of
from lmcache_ext.keys import ChunkKey
from lmcache_ext.metrics import EngineMetrics, RunningAverage, TierCounters
from lmcache_ext.storage.base import Chunk, ChunkLease, StorageTier
from lmcache_ext.storage.cpu import CPUTier
from lmcache_ext.storage.write_behind import WriteBehind

log = logging.getLogger(__name__)
SPEED_EWMA_WEIGHT = 0.2  # weight of the newest read in a tier's running speed


class TieredStore:
    """Thread-safe. ``tiers`` fastest first; the store closes them on ``close()``."""

    def __init__(self, tiers: Sequence[StorageTier], metrics: EngineMetrics,
                 write_behind_queue_chunks: int = default_of("write_behind_queue_chunks"),
                 read_threads: int = 4):
        """``read_threads``: chunks of one ``get_prefix`` read from slower tiers at once."""
        if not tiers:
            raise ValueError("a tiered store needs at least one tier")
        self.tiers = list(tiers)
        self._counters: dict[str, TierCounters] = {t.name: metrics.for_tier(t.name) for t in tiers}
        self._behind = [
            WriteBehind(tier, self._counters[tier.name], write_behind_queue_chunks)
            for tier in self.tiers[1:]
        ]
        # Slower tiers block on I/O and decode: one request's chunks are read on these threads so
        # the reads overlap each other and the decode of the chunks before them (a disk serves
        # several reads in flight faster than one after another). Tiers before ``_inline`` (RAM)
        # are read on the caller's thread.
        self._inline = 1 if self.tiers[0].in_memory else 0
        self._readers = (ThreadPoolExecutor(read_threads, thread_name_prefix="tier-read")
                         if len(self.tiers) > self._inline and read_threads > 1 else None)
        self._read_ahead = max(1, read_threads)
        self._read_bytes_per_s = {t.name: RunningAverage(SPEED_EWMA_WEIGHT) for t in self.tiers}

    @property
    def puts_in_memory(self) -> bool:
        """A ``put`` returns once the chunk is in RAM (the first tier's; the slower tiers are
        written behind): it never waits on a disk or the network."""
        return self.tiers[0].in_memory

    def prefix_length(self, keys: Sequence[ChunkKey], local_only: bool = False) -> int:
        """Longest run of ``keys`` from the first that some tier holds (tiers may alternate).
        ``local_only``: ask only the tiers that answer from memory (``local_index``), never the
        network: what a step thread may ask."""
        return len(self.locate(keys, local_only))

    def locate(self, keys: Sequence[ChunkKey], local_only: bool = False) -> list[str]:
        """The name of the fastest tier holding each key of the longest held run of ``keys``
        (``local_only``: as in ``prefix_length``)."""
        tiers = [t for t in self.tiers if t.local_index] if local_only else self.tiers
        names: list[str] = []
        while len(names) < len(keys):
            for tier in tiers:
                step = tier.prefix_length(keys[len(names):])
                if step:
                    names += [tier.name] * step
                    break
            else:
                break
        return names

    def read_speeds(self) -> dict[str, float]:
        """Measured read speed of each tier in bytes/s (probe, then a running average of real
        reads of slower tiers, promotion included); tiers not measured yet are absent."""
        speeds = {name: average.value for name, average in self._read_bytes_per_s.items()}
        return {name: speed for name, speed in speeds.items() if speed is not None}

    def observe_read(self, tier: str, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds <= 0:
            return
        self._read_bytes_per_s[tier].observe(nbytes / seconds)

    def get(self, key: ChunkKey) -> ChunkLease | None:
        """A lease on the chunk from the fastest tier that has it; promotes slower hits."""
        return self._get_from(key, 0)

    def get_prefix(self, keys: Sequence[ChunkKey], decoded: bool = True) -> Iterator[ChunkLease]:
        """Leases on ``keys`` in order, stopping at the first miss; the caller releases each.

        Chunks not in the first tier are read up to ``read_threads`` at a time, ahead of the
        caller, so one request's disk reads overlap, and a chunk a tier stores encoded is
        decoded there too; ``decoded=False`` leaves it encoded (``Chunk.coded``) for a caller
        that decodes it straight into its destination. Close the iterator
        (``contextlib.closing``) when stopping early: leases read ahead are then released.
        """
        pending: deque[Future[ChunkLease | None]] = deque()
        ahead = iter(keys)
        try:
            self._read_ahead_into(pending, ahead, decoded)
            while pending:
                lease = pending.popleft().result()
                if lease is None:
                    return
                self._read_ahead_into(pending, ahead, decoded)
                yield lease
        finally:
            for future in pending:
                if not future.cancel() and (lease := future.result()) is not None:
                    lease.release()

    def _read_ahead_into(self, pending: deque, keys: Iterator[ChunkKey], decoded: bool) -> None:
        """Start gets until ``read_ahead`` are pending (bounding the leases held ahead of the
        caller); in-memory first-tier hits are taken inline, the rest go to the reader threads."""
        inline = self._inline
        while len(pending) < self._read_ahead and (key := next(keys, None)) is not None:
            lease = self._get_from(key, 0, last=inline - 1) if inline else None
            if lease is None and self._readers is not None:
                pending.append(self._readers.submit(self._get_from, key, inline, None, decoded))
                continue
            future: Future[ChunkLease | None] = Future()
            future.set_result(lease if lease is not None
                              else self._get_from(key, inline, None, decoded))
            pending.append(future)

    def _get_from(self, key: ChunkKey, first: int, last: int | None = None,
                  decoded: bool = True) -> ChunkLease | None:
        """``get`` looking only in tiers ``first`` to ``last`` (all the rest when None); an
        encoded chunk decoded unless ``decoded`` is False (see ``get_prefix``)."""
        stop = len(self.tiers) if last is None else last + 1
        for level in range(first, stop):
            tier = self.tiers[level]
            began = time.perf_counter()
            lease = tier.get(key)
            if lease is None:
                continue
            if decoded and lease.chunk.coded is not None:
                lease.chunk.kv  # noqa: B018 (decoded here, on this reader thread)
            nbytes = lease.chunk.meta.nbytes
            counters = self._counters[tier.name]
            counters.hits.inc()
            counters.retrieved_bytes.inc(nbytes)
            if level > 0:
                promoted = self._promote(key, lease.chunk, level)
                self.observe_read(tier.name, nbytes, time.perf_counter() - began)
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
        if self.tiers[0].name != CPUTier.name:
            chunk = _on_host(chunk)  # files and the network take host bytes
        if self.tiers[0].put(key, chunk):  # the CPU tier copies from any device: one hop
            self._write_behind(key, range(len(self._behind)))
            return True
        chunk = _on_host(chunk)
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

    def flush_tier(self, name: str, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for the write-behind queue of tier ``name`` to empty;
        returns the chunks still queued or being written (0 for a tier without a queue)."""
        behind = next((b for b in self._behind if b.tier.name == name), None)
        return behind.flush(timeout_s) if behind is not None else 0

    def tier(self, name: str) -> StorageTier | None:
        """The tier called ``name``, None if this store has none."""
        return next((t for t in self.tiers if t.name == name), None)

    def close(self, discard_queued: bool = False) -> None:
        """Close every tier; write-behinds still queued are written first, or dropped
        (counted) with ``discard_queued`` (an exit that must not wait for them)."""
        if self._readers is not None:
            self._readers.shutdown(wait=True)
        for behind in self._behind:
            behind.close(discard_queued)
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


def _on_host(chunk: Chunk) -> Chunk:
    """``chunk`` with its KV in host memory (a GPU's chunk comes from the connector's staging
    buffer when no CPU tier takes it first: one chunk-sized copy)."""
    return chunk if chunk.kv.device.type == "cpu" else Chunk(chunk.kv.cpu())
