"""The disk tier's bookkeeping: which chunk files exist, in what recency, and how many bytes of the
budget they hold. Plain Python and no file I/O: the tier (``disk.py``) moves the bytes and calls
this index to decide.

Every byte a chunk can have on disk is counted from the moment it is reserved until its file is
gone, so ``used_bytes`` never exceeds ``budget_bytes`` and bytes on disk never exceed
``used_bytes``. Sizes are counted padded to whole ``ALIGN`` blocks, as files are written.

Two phases for anything in flight:
- a write: ``reserve`` (bytes counted, entry in flight, not yet visible to lookups), the caller
  writes a temporary file, then ``commit`` (visible) or, on failure, ``abandon`` (bytes back);
- a delete (``evict``, ``remove``): the entry leaves the index at once but its bytes stay counted;
  the caller deletes the file, then ``release`` gives the bytes back. A write in flight is never
  evicted; removing one marks it removed and its writer gives the bytes back with ``abandon``.

Thread-safety: none of its own. The owner serialises every call, and every read of an entry's
fields, with one lock, held in a ``with lock:`` block only (the tier holds its lock around the
renames that must agree with the index, too).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lmcache_ext.storage.direct_io import padded


@dataclass(eq=False)
class DiskEntry:
    """One chunk file. ``size`` is its padded size in bytes."""

    name: str
    size: int
    ready: bool = False  # False while its first write is in flight
    removed: bool = False  # out of the index (evicted, removed or abandoned)
    counted: bool = True  # its size is in ``used_bytes``, until its file is gone


@dataclass(frozen=True)
class Reservation:
    """What ``reserve`` decided. Exactly one of:

    - ``entry``: a new in-flight entry; write its file, then ``commit`` or ``abandon`` it;
    - ``stored``: the chunk is already here, or another writer is writing it: nothing to do;
    - ``victims``: entries evicted to make room; delete their files, ``release`` them, and
      ``reserve`` again;
    - none of these: no room can be made (the chunk is too large, or the rest of the budget is
      writes in flight and files being deleted).
    """

    entry: DiskEntry | None = None
    stored: bool = False
    victims: tuple[DiskEntry, ...] = ()


class DiskIndex:
    """Chunk names in least-recent-first order, with a byte budget. See the module docstring."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, DiskEntry] = OrderedDict()  # least recent first
        self._used = 0
        self.peak_used_bytes = 0

    # ------------------------------------------------------------ questions

    @property
    def used_bytes(self) -> int:
        """Bytes reserved, on disk, or waiting for their file's deletion."""
        return self._used

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Names in the index (ready or in flight), least recent first."""
        return list(self._entries)

    def contains(self, name: str | None) -> bool:
        entry = self._entries.get(name) if name else None
        return entry is not None and entry.ready

    def prefix_length(self, names: Sequence[str | None]) -> int:
        """How many of ``names``, from the first, are ready with no gap."""
        for count, name in enumerate(names):
            if not self.contains(name):
                return count
        return len(names)

    # ------------------------------------------------------------ recency

    def use(self, name: str | None) -> DiskEntry | None:
        """The ready entry for ``name`` (now the most recent), or None."""
        if not self.contains(name):
            return None
        self._entries.move_to_end(name)
        return self._entries[name]

    def touch(self, names: Sequence[str | None]) -> None:
        """``names`` were used as one prefix: the first ends most recent (needed longest)."""
        for name in reversed(names):
            if name in self._entries:
                self._entries.move_to_end(name)

    # ------------------------------------------------------------ writes

    def adopt(self, name: str, file_bytes: int) -> DiskEntry:
        """A file found on disk at start: ready and counted, as the most recent. May take the
        index over its budget: call ``evict(0)`` after adopting them all."""
        entry = self._entries[name] = DiskEntry(name, padded(file_bytes), ready=True)
        self._count(entry.size)
        return entry

    def reserve(self, name: str, nbytes: int) -> Reservation:
        """Phase one of a write of ``nbytes`` (counted padded). See ``Reservation``."""
        size = padded(nbytes)
        if size > self.budget_bytes:
            return Reservation()
        entry = self._entries.get(name)
        if entry is not None:
            self._entries.move_to_end(name)
            return Reservation(stored=True)
        if self._used + size <= self.budget_bytes:
            entry = self._entries[name] = DiskEntry(name, size)
            self._count(size)
            return Reservation(entry=entry)
        return Reservation(victims=tuple(self.evict(size)))

    def commit(self, entry: DiskEntry) -> bool:
        """Phase two of a write: the file is in place; lookups see it. False (nothing changed) if
        the entry was removed meanwhile: the caller deletes its file and calls ``abandon``."""
        if entry.removed:
            return False
        entry.ready = True
        return True

    def abandon(self, entry: DiskEntry) -> None:
        """A write failed, or its entry was removed while in flight, and its file is gone: take it
        out (if still in) and give its bytes back. Idempotent."""
        self._take_out(entry)
        self._uncount(entry)

    # ------------------------------------------------------------ deletes

    def evict(self, size: int) -> list[DiskEntry]:
        """Phase one of eviction: take least recent ready entries out until ``size`` more bytes
        would fit once they are released. Their bytes stay counted until ``release``."""
        victims, freed = [], 0
        for entry in self._entries.values():  # least recent first; stops early
            if self._used - freed + size <= self.budget_bytes:
                break
            if entry.ready:
                victims.append(entry)
                freed += entry.size
        for entry in victims:
            self._take_out(entry)
        return victims

    def remove(self, name: str | None, expected: DiskEntry | None = None) -> DiskEntry | None:
        """Phase one of a delete: take ``name`` out (only if it still is ``expected``, when given)
        and return its entry. A ready entry's bytes stay counted until ``release``; an in-flight
        one's writer gives them back (its ``commit`` fails, then it calls ``abandon``)."""
        entry = self._entries.get(name) if name else None
        if entry is None or (expected is not None and entry is not expected):
            return None
        self._take_out(entry)
        return entry

    def release(self, entries: Iterable[DiskEntry]) -> None:
        """Phase two of a delete: these entries' files are gone; give their bytes back. Entries
        that were in flight when removed are skipped (their writers give the bytes back)."""
        for entry in entries:
            if entry.ready:
                self._uncount(entry)

    # ------------------------------------------------------------ internals

    def _take_out(self, entry: DiskEntry) -> None:
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
        entry.removed = True

    def _count(self, size: int) -> None:
        self._used += size
        self.peak_used_bytes = max(self.peak_used_bytes, self._used)

    def _uncount(self, entry: DiskEntry) -> None:
        if entry.counted:
            entry.counted = False
            self._used -= entry.size
