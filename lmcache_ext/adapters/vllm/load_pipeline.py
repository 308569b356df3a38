"""One load's chunks into vLLM's paged blocks, double-buffered: tier buffer -> staging buffer
(a ``non_blocking`` host-to-device copy on a copy stream) -> scatter into the blocks (on a
scatter stream that waits for that copy's event). While the GPU copies and scatters chunk i, the
host reads and queues chunk i+1; it waits only for chunk i-1's copy (to give back its tier lease)
and scatter (to reuse its staging buffer). On a CPU there is no staging: each chunk is scattered
straight from the tier's buffer (a quantized one decoded straight into the blocks),
synchronously, and its lease given back at once.

Ownership: ``push`` takes the chunk's lease; ``finish`` (call it in a ``finally``) waits for
every copy still in flight and gives every lease and staging buffer back, whatever failed. A
lease is never given back before the copy that reads its buffer has completed (a tier may reuse
that memory for another chunk the moment it is released).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmcache_ext import kernels
from lmcache_ext.adapters.vllm.staging import StagingArea
from lmcache_ext.codecs import paged_decode
from lmcache_ext.kernels.streams import SideStream
from lmcache_ext.storage import ChunkLease

DEPTH = 2  # chunks in flight per load (double buffering)


@dataclass
class LoadStreams:
    """A loader thread's two streams (one pair per thread that loads)."""

    copy: SideStream
    scatter: SideStream


@dataclass
class _InFlight:
    lease: ChunkLease
    buffer: torch.Tensor
    copied: Any = None  # the host-to-device copy's event (the lease may go after it)
    scattered: Any = None  # the scatter's event (the buffer may be reused after it)


class LoadPipeline:
    """One thread's load. ``slots`` (host, int64, pinned on a GPU host) maps each position of
    the load to its paged-cache slot; it is moved to the device once, without a host wait.
    ``after``: an event the copies wait for on the device (vLLM's compute stream when the load
    was planned). ``staged``: through the staging buffers (default: where the KV is on a
    device; on the host the scatter reads the tier's buffer itself)."""

    def __init__(self, staging: StagingArea, views: Sequence[kernels.PagedKV],
                 streams: LoadStreams, slots: torch.Tensor, after: Any,
                 staged: bool | None = None):
        self._staging, self._views, self._streams = staging, views, streams
        self._after = after
        self._depth = max(1, min(DEPTH, staging.count))
        self._inflight: deque[_InFlight] = deque()
        self._failed = False
        with streams.scatter.run(after):  # used only by the scatters, on that stream
            self._slots = slots.to(views[0].k.device, non_blocking=True)
        self._host_slots = slots  # bounds are checked on this copy: no device sync
        self._staged = views[0].k.device.type != "cpu" if staged is None else staged
        self.last: Any = None  # the last scatter's event: the blocks hold the KV after it

    @property
    def wants_decoded(self) -> bool:
        """Whether ``push`` needs a quantized chunk's KV decoded (a staged copy: the tier's
        reader threads decode it, in parallel); on the host it is decoded straight into the
        blocks, so the tier should hand it over encoded."""
        return self._staged

    def push(self, lease: ChunkLease, lo: int, hi: int, at: int) -> None:
        """Queue tokens [lo, hi) of the lease's chunk into the load's positions [at, at + hi -
        lo). Takes the lease (given back by ``finish`` at the latest)."""
        kept = lease.hand_over()
        if not self._staged:
            self._scatter_from_tier(kept, lo, hi, at)
            return
        try:
            buffer = self._buffer()
        except BaseException:
            kept.release()
            raise
        entry = _InFlight(kept, buffer)
        self._inflight.append(entry)
        self._failed = True  # until both copies are queued
        staged = buffer[:, :, :hi - lo]  # [layers, 2, tokens, kv_heads, head_dim]
        with self._streams.copy.run(self._after):
            staged.copy_(kept.chunk.kv[:, :, lo:hi], non_blocking=True)
            entry.copied = self._streams.copy.mark()
        with self._streams.scatter.run(entry.copied):
            kernels.scatter(staged, self._views, self._slots[at:at + hi - lo],
                            host_slots=self._host_slots[at:at + hi - lo])
            entry.scattered = self.last = self._streams.scatter.mark()
        self._failed = False

    def _scatter_from_tier(self, kept: ChunkLease, lo: int, hi: int, at: int) -> None:
        """On the host: scatter straight from the tier's buffer (a copy into a staging buffer
        first would move every byte twice: ~19 ms more for a 4K-token SmolLM2 hit here), or
        decode a quantized chunk straight into the blocks (``paged_decode``), then give the
        lease back; the copy is synchronous there."""
        slots = self._slots[at:at + hi - lo]
        try:
            coded = kept.chunk.coded
            if coded is None or not paged_decode.decode_into(
                    coded.codec, coded.payload, coded.meta, lo, hi, self._views, slots):
                kernels.scatter(kept.chunk.kv[:, :, lo:hi], self._views, slots,
                                host_slots=self._host_slots[at:at + hi - lo])
        finally:
            kept.release()

    def finish(self) -> None:
        """Wait for the copies in flight (all of them, on the host, if anything failed) and
        give every lease and buffer back. Idempotent."""
        try:
            if self._failed:
                self._streams.copy.synchronize()
                self._streams.scatter.synchronize()
        finally:
            while self._inflight:
                self._retire()

    def _buffer(self) -> torch.Tensor:
        """A staging buffer: first our own oldest back once the window is full or none is
        free (never wait on ourselves), else one another transfer gives back."""
        if len(self._inflight) >= self._depth:
            self._retire()
        while (buffer := self._staging.try_acquire()) is None and self._inflight:
            self._retire()
        return buffer if buffer is not None else self._staging.acquire()

    def _retire(self) -> None:
        entry = self._inflight.popleft()
        try:
            if entry.copied is not None:
                entry.copied.synchronize()  # the tier's buffer has been read
        finally:
            entry.lease.release()
            self._staging.release(entry.buffer, entry.scattered)
