"""Byte buffers for the CPU tier: allocated lazily, recycled by size, never beyond a budget.

Recycling matters for speed, not only for allocation cost: a fresh buffer's pages fault in on the
first write, which makes a store several times slower than a copy into warm memory. Buffers are
pinned (page-locked) when a GPU is present so copies to and from it run at full speed; CPU-only
torch refuses pin_memory, so plain memory is used there.

Not thread-safe by itself: the CPU tier calls it under its own lock.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def _pin_memory_available() -> bool:
    return torch.cuda.is_available()


class BufferPool:
    """Hands out flat uint8 buffers; ``allocated_bytes`` (in use + pooled) never exceeds budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.allocated_bytes = 0
        self.peak_allocated_bytes = 0
        self._pooled: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._pooled_bytes = 0
        self._pin = _pin_memory_available()

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A buffer of exactly ``nbytes``, or None if the budget has no room even after dropping
        pooled buffers of other sizes (then the caller evicts and asks again)."""
        pooled = self._pooled.get(nbytes)
        if pooled:
            self._pooled_bytes -= nbytes
            return pooled.pop()
        while self.allocated_bytes + nbytes > self.budget_bytes and self._pooled_bytes:
            self._drop_one_pooled()
        if self.allocated_bytes + nbytes > self.budget_bytes:
            return None
        self.allocated_bytes += nbytes
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)

    def give_back(self, buffer: torch.Tensor) -> None:
        """Return a buffer for reuse (it stays counted in ``allocated_bytes``)."""
        self._pooled[buffer.numel()].append(buffer)
        self._pooled_bytes += buffer.numel()

    def _drop_one_pooled(self) -> None:
        size = next(size for size, buffers in self._pooled.items() if buffers)
        self._pooled[size].pop()
        self._pooled_bytes -= size
        self.allocated_bytes -= size
