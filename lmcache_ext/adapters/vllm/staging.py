"""The worker's transfer memory: a few chunk-sized buffers on the KV's device, allocated once.

Every save moves its KV out of vLLM's paged blocks through these buffers one chunk at a time
(gather into a buffer, then the saver thread copies it into the CPU tier's buffer: on a GPU that
copy is the one device-to-host hop, into the tier's pinned memory). A load from a GPU's tiers
goes the other way (tier buffer -> staging buffer -> scatter). So the memory a transfer needs is
``staging_chunks`` chunks whatever the prompt's length: a 1M-token prompt of a 7B model would
otherwise ask for a 56 GB temporary. When every buffer is in flight the next transfer waits for
the oldest (counted in ``waits``), at most ``timeout_s``: then ``acquire`` raises
``StagingTimeout`` and that one transfer fails (a load is recomputed, a save skipped), never the
engine. Every user gives its buffer back in a ``finally``.
"""

from __future__ import annotations

import math
import queue
from typing import Any

import torch

from lmcache_ext.chunk import KVLayout

ACQUIRE_TIMEOUT_S = 10.0  # a buffer not back by then is lost or stuck: fail the transfer


class StagingTimeout(RuntimeError):
    """No staging buffer came back in time (the transfer that asked fails, not the engine)."""


class StagingArea:
    """Thread-safe. ``acquire`` a buffer ``[layers, 2, chunk_size, kv_heads, head_dim]``,
    use a leading slice of it, ``release`` it (on a GPU with the event after its last use)."""

    def __init__(self, layout: KVLayout, chunk_size: int, device: torch.device, count: int,
                 timeout_s: float = ACQUIRE_TIMEOUT_S):
        shape = layout.shape(chunk_size)
        self._free: queue.Queue[tuple[torch.Tensor, Any]] = queue.Queue()
        for _ in range(count):
            self._free.put((torch.empty(shape, dtype=layout.dtype, device=device), None))
        self.count = count
        self.allocated_bytes = count * math.prod(shape) * layout.dtype.itemsize
        self.timeout_s = timeout_s
        self.waits = 0  # acquires that found every buffer in flight
        self.timeouts = 0  # acquires that gave up (StagingTimeout)

    def try_acquire(self) -> torch.Tensor | None:
        """A free buffer, or None if every buffer is in flight."""
        try:
            return self._ready(*self._free.get_nowait())
        except queue.Empty:
            return None

    def acquire(self) -> torch.Tensor:
        """A free buffer; waits for one at most ``timeout_s``, then raises ``StagingTimeout``
        (the transfer that asked fails, not the engine)."""
        buffer = self.acquire_within(self.timeout_s)
        if buffer is None:
            self.timeouts += 1
            raise StagingTimeout(f"no staging buffer came back in {self.timeout_s:.1f} s (all "
                                 f"{self.count} in flight)")
        return buffer

    def acquire_within(self, seconds: float) -> torch.Tensor | None:
        """A free buffer, waiting for one at most ``seconds``; None if none came back."""
        buffer = self.try_acquire()
        if buffer is not None or seconds <= 0:
            return buffer
        self.waits += 1
        try:
            return self._ready(*self._free.get(timeout=seconds))
        except queue.Empty:
            return None

    @staticmethod
    def _ready(buffer: torch.Tensor, used: Any) -> torch.Tensor:
        if used is not None:
            used.synchronize()  # the GPU has finished the copies that last read or wrote it
        return buffer

    def free(self) -> int:
        """Buffers not in use now (a count that stays below ``count`` when idle is a leak)."""
        return self._free.qsize()

    def release(self, buffer: torch.Tensor, used: Any = None) -> None:
        """Give ``buffer`` back; ``used`` (a CUDA event recorded after its last copy) makes the
        next ``acquire`` wait for that copy."""
        self._free.put((buffer, used))
