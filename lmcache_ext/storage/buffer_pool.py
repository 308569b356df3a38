"""Byte buffers for the CPU tier, cut from one slab of exactly the budget (``pinned``), never
more: the tier's memory is allocated (and, with a GPU, pinned) once at start, and a chunk's
buffer is a slice of it.

Buffers are handed out first-fit over the free extents of the slab, each rounded up to ``ALIGN``
bytes, and freed extents merge with their free neighbours. Trade-off: chunks of one model are of
one size (a full chunk) but for a prompt's last partial chunk, so a freed chunk leaves a hole any
chunk fits and fragmentation stays small; where it bites (partial chunks pinned between free
holes) the tier evicts more, least recent first, until a hole fits, and rejects the chunk if
pinned chunks leave none. Fixed slots of the largest chunk would never fragment but need the
chunk size before the first store and waste the rest of a slot on every partial chunk.

Not thread-safe by itself: the CPU tier calls it under its own lock (the slab is allocated
before, outside any lock).
"""

from __future__ import annotations

import bisect

import torch

from lmcache_ext.storage.pinned import allocate_slab, release_slab

ALIGN = 512  # bytes: every buffer starts at a multiple of this in the slab


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class BufferPool:
    """Hands out flat uint8 slices of one slab; ``allocated_bytes`` (bytes in use, rounded to
    ``ALIGN``) never exceeds ``budget_bytes``, and the slab is never grown."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.slab = allocate_slab(budget_bytes)  # [budget_bytes] uint8
        self.allocated_bytes = 0
        self.peak_allocated_bytes = 0
        self._free: list[tuple[int, int]] = [(0, budget_bytes)] if budget_bytes else []
        self._base = self.slab.data_ptr()
        self._closed = False

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A buffer of exactly ``nbytes``, or None if no free extent holds it (then the caller
        evicts and asks again)."""
        for index, (offset, length) in enumerate(self._free):
            if length >= nbytes:
                size = self._extent(offset, nbytes)
                if length == size:
                    del self._free[index]
                else:
                    self._free[index] = (offset + size, length - size)
                self.allocated_bytes += size
                self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
                return self.slab[offset:offset + nbytes]
        return None

    def give_back(self, buffer: torch.Tensor) -> None:
        """Return a buffer from ``take``; its extent merges with free neighbours."""
        offset = buffer.data_ptr() - self._base
        size = self._extent(offset, buffer.numel())
        self.allocated_bytes -= size
        index = bisect.bisect(self._free, (offset, size))
        if index < len(self._free) and offset + size == self._free[index][0]:
            size += self._free.pop(index)[1]
        if index > 0 and self._free[index - 1][0] + self._free[index - 1][1] == offset:
            offset, size = self._free[index - 1][0], self._free[index - 1][1] + size
            index -= 1
            del self._free[index]
        self._free.insert(index, (offset, size))

    def _extent(self, offset: int, nbytes: int) -> int:
        """The bytes a buffer of ``nbytes`` at ``offset`` occupies: rounded up to ``ALIGN``,
        but for the last one, which ends with the slab."""
        return min(_rounded(max(nbytes, 1)), self.budget_bytes - offset)

    def free_extents(self) -> int:
        """Free holes in the slab (1 when nothing is in use: fragmentation shows as more)."""
        return len(self._free)

    def close(self) -> None:
        """Unpin the slab (the tier is closed: no buffer of it is used any more). Idempotent."""
        if not self._closed:
            self._closed = True
            release_slab(self.slab)
