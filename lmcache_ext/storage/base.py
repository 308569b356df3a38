"""The one storage interface every tier implements, and the types that cross it.

Contract for every ``StorageTier``:
- Every method is thread-safe and may be called from any thread.
- Failures never escape as exceptions to the caller: a corrupt chunk, an I/O error or a store that
  went away make ``get`` return None (a miss) and ``put`` return False; the tier counts them.
- ``put`` copies the chunk's bytes; the caller may reuse its tensor as soon as ``put`` returns.
- ``get`` returns a ``ChunkLease``: the chunk cannot be evicted until the lease is released, so
  release it (``with`` does) as soon as the bytes are copied out. Leases are cheap.
- ``contains``/``prefix_length`` answer from the tier's index; a later ``get`` may still miss
  (eviction, corruption found on read): callers treat ``get``'s answer as the truth.
- ``put``/``get`` of the CPU tier never block on I/O; slower tiers may block for their I/O but
  bound it with timeouts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmcache_ext.chunk import ChunkMeta
from lmcache_ext.codecs import CodedKV
from lmcache_ext.keys import ChunkKey


class Chunk:
    """KV of one chunk: ``kv`` is ``[layers, 2, tokens, kv_heads, head_dim]`` (may be strided).

    A chunk read from a tier that stores it encoded may hold the checked payload instead
    (``coded``): ``kv`` then decodes it on first use (within the lease: the payload may view the
    tier's buffer), and a loader that can decode it straight into its destination uses
    ``coded`` and never asks for ``kv``. One consumer at a time, as a lease is."""

    __slots__ = ("coded", "_kv")

    def __init__(self, kv: torch.Tensor | CodedKV):
        self.coded = kv if isinstance(kv, CodedKV) else None
        self._kv = None if isinstance(kv, CodedKV) else kv

    @property
    def kv(self) -> torch.Tensor:
        if self._kv is None:
            assert self.coded is not None
            self._kv = self.coded.decode()
        return self._kv

    @property
    def meta(self) -> ChunkMeta:
        return self.coded.meta if self.coded is not None else ChunkMeta.of(self.kv)


class ChunkLease:
    """A chunk held in place until ``release()``; a context manager. Releasing twice is a no-op."""

    __slots__ = ("chunk", "_release")

    def __init__(self, chunk: Chunk, release: Callable[[], None] | None = None):
        self.chunk = chunk
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def hand_over(self) -> ChunkLease:
        """A new lease that now holds the chunk; this one no longer does (its ``release``
        becomes a no-op). For a caller that must keep the chunk past a ``with`` block, e.g.
        until an asynchronous copy out of it has completed."""
        release, self._release = self._release, None
        return ChunkLease(self.chunk, release)

    def __enter__(self) -> ChunkLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class TierUsage:
    used_bytes: int  # bytes of chunks held (for the CPU tier: its slab's bytes in use)
    capacity_bytes: int
    num_chunks: int


class StorageTier(ABC):
    """One tier of the cache (CPU RAM, local disk, a remote store). See the module contract."""

    name: str
    # ``contains`` / ``prefix_length`` answer from this process's memory (no I/O, no network),
    # so they may be asked on a serving engine's step thread.
    local_index: bool = True
    in_memory: bool = False  # a get is a copy-free lookup in RAM (no I/O, no decode)

    @abstractmethod
    def contains(self, key: ChunkKey) -> bool: ...

    @abstractmethod
    def get(self, key: ChunkKey) -> ChunkLease | None: ...

    @abstractmethod
    def put(self, key: ChunkKey, chunk: Chunk) -> bool: ...

    @abstractmethod
    def remove(self, key: ChunkKey) -> bool: ...

    @abstractmethod
    def usage(self) -> TierUsage: ...

    def prefix_length(self, keys: Sequence[ChunkKey]) -> int:
        """How many of ``keys``, from the first, the tier holds with no gap."""
        for index, key in enumerate(keys):
            if not self.contains(key):
                return index
        return len(keys)

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        """Recency hint: ``keys`` were just used as one prefix, the first needed longest."""

    def close(self) -> None:
        """Release the tier's resources (threads, connections, files). Idempotent."""
