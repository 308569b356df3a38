"""Local disk tier: one file per chunk, a byte budget never exceeded, LRU eviction, O_DIRECT.

Layout: ``<directory>/<namespace id>/<key digest hex>``; each file is a chunk (128-byte checksummed
header, then the KV) padded to 4096 bytes. Another namespace's directory is never read, so keys of
another model or KV layout are never served.

Bookkeeping is apart from the I/O: a short lock guards the index (least recent first) and the byte
count; reads, writes and deletes run outside it, so threads do I/O in parallel. Two phases for
anything in flight:
- a write reserves its padded size first (in-flight bytes count against the budget), writes a
  temporary file, then, under the lock, renames it into place and marks it ready;
- eviction takes a file out of the index and renames it to a temporary name under the lock, then
  deletes it outside the lock; only then are its bytes given back. A reader that opened the file
  before keeps reading it (an open fd outlives an unlink on Linux).
So bytes on disk (chunks, temporaries, files awaiting deletion) never exceed ``_used`` and
``_used`` never exceeds the budget.

On start the index is rebuilt from the directory (name, size and mtime; least recent mtime first)
and leftover temporaries are deleted, so a restart keeps the cache and never orphans files.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from lmcache_ext.chunk import HEADER_SIZE, ChunkCorrupt, ChunkMeta, as_kv, decode, encode_header
from lmcache_ext.keys import ChunkKey
from lmcache_ext.metrics import EngineMetrics, TierCounters
from lmcache_ext.storage import direct_io
from lmcache_ext.storage.base import Chunk, ChunkLease, StorageTier, TierUsage
from lmcache_ext.storage.direct_io import TEMP_PREFIX, AlignedBuffer, padded, unlink_quietly

log = logging.getLogger(__name__)
_CHUNK_NAME = re.compile(r"[0-9a-f]{32}|[0-9a-f]{64}")  # 16- or 32-byte key digests
LOG_INTERVAL_S = 30.0


@dataclass(eq=False)
class _Entry:
    size: int  # bytes on disk (padded)
    ready: bool = False  # False while the first write is in flight
    removed: bool = False  # out of the index


class _EveryInterval:
    """True at most once per ``seconds``: errors that repeat are logged, not flooded."""

    def __init__(self, seconds: float):
        self._seconds = seconds
        self._next = 0.0
        self._lock = threading.Lock()

    def due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                return False
            self._next = now + self._seconds
            return True


class DiskTier(StorageTier):
    """Chunks as files under ``directory/namespace``. Thread-safe; never raises after start.

    ``__init__`` raises OSError naming the path if the directory cannot be created or written.
    ``odirect_active`` says whether reads and writes bypass the page cache (decided once, by a
    probe, and logged loudly when ``use_odirect`` was asked for and cannot be honoured).
    """

    name = "disk"

    def __init__(self, directory: str, budget_bytes: int, namespace: str,
                 use_odirect: bool = False, counters: TierCounters | None = None):
        self.namespace = namespace
        self.directory = os.path.join(os.path.abspath(directory), namespace)
        self.budget_bytes = budget_bytes
        self._counters = counters or EngineMetrics().for_tier(self.name)
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # least recent first
        self._lock = threading.Lock()
        self._used = 0  # bytes reserved or on disk, see the module docstring
        self.peak_used_bytes = 0
        self._write_buffers = threading.local()  # one reused aligned buffer per writer thread
        self._buffers = direct_io.BufferCache()  # read buffers, recycled when leases end
        self._write_log = _EveryInterval(LOG_INTERVAL_S)
        self._read_log = _EveryInterval(LOG_INTERVAL_S)
        started = time.perf_counter()
        _make_directory(self.directory)
        self.odirect_active, self.odirect_reason = self._decide_odirect(use_odirect)
        self._recover()
        self.startup_seconds = time.perf_counter() - started

    # ------------------------------------------------------------ the interface

    def contains(self, key: ChunkKey) -> bool:
        name = self._name(key)
        with self._lock:
            entry = self._index.get(name) if name else None
            return entry is not None and entry.ready

    def prefix_length(self, keys: Sequence[ChunkKey]) -> int:
        names = [self._name(key) for key in keys]
        with self._lock:
            for count, name in enumerate(names):
                entry = self._index.get(name) if name else None
                if entry is None or not entry.ready:
                    return count
            return len(names)

    def get(self, key: ChunkKey) -> ChunkLease | None:
        """Read and verify the chunk into an aligned buffer the lease holds until released (then
        it is recycled for the next read). A missing, short or corrupt file is a miss: counted,
        and the file deleted."""
        name = self._name(key)
        with self._lock:
            entry = self._index.get(name) if name else None
            if entry is None or not entry.ready:
                return None
            self._index.move_to_end(name)
        try:
            data = self._read(name, entry.size)
        except FileNotFoundError:
            self._drop(name, entry, "its file was deleted behind the tier's back", vanished=True)
            return None
        except OSError as exc:
            self._counters.errors.inc()
            if self._read_log.due():
                log.error("disk tier: reading %s failed (served as a miss): %s", name, exc)
            return None
        if data is None:
            self._drop(name, entry, "the file is larger than the chunk written")
            return None
        buffer, nbytes = data
        try:
            meta, payload = decode(key, buffer.tensor[:nbytes])
        except ChunkCorrupt as exc:
            self._buffers.give_back(buffer)
            self._drop(name, entry, str(exc))
            return None
        return ChunkLease(Chunk(as_kv(meta, payload)), lambda: self._buffers.give_back(buffer))

    def put(self, key: ChunkKey, chunk: Chunk) -> bool:
        """Write the chunk (synchronously: TieredStore calls this from write-behind threads).
        False if there is no room (counted as rejected) or the write failed (counted as errors)."""
        name = self._name(key)
        if name is None:
            self._counters.rejected.inc()
            return False
        try:
            meta = chunk.meta
            size = padded(HEADER_SIZE + meta.nbytes)
        except Exception:  # not a KV tensor we can store: a caller bug, still never a raise
            log.exception("disk tier: cannot store %s", name)
            self._counters.errors.inc()
            return False
        entry = self._reserve(name, size)
        if entry is None:
            self._counters.rejected.inc()
            return False
        if entry.ready or entry is _IN_FLIGHT:
            return True  # already stored, or another thread is writing the same chunk
        return self._write(key, name, entry, chunk, meta)

    def remove(self, key: ChunkKey) -> bool:
        name = self._name(key)
        with self._lock:
            entry = self._index.get(name) if name else None
            if entry is None:
                return False
            doomed = self._retire(name, entry)
        self._delete([doomed])
        return True

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        names = [self._name(key) for key in reversed(keys)]
        with self._lock:
            for name in names:
                if name in self._index:
                    self._index.move_to_end(name)

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._used, self.budget_bytes, len(self._index))

    # ------------------------------------------------------------ start-up

    def _decide_odirect(self, wanted: bool) -> tuple[bool, str]:
        if not wanted:
            direct_io.check_writable(self.directory)
            return False, "use_odirect is off"
        active, reason = direct_io.probe_odirect(self.directory)
        if active:
            log.info("disk tier: %s", reason)
        else:
            log.warning("disk tier: use_odirect is on but %s; THE WHOLE DISK TIER USES BUFFERED "
                        "I/O (the page cache) instead", reason)
        return active, reason

    def _recover(self) -> None:
        """Rebuild the index from the directory, delete temporaries, evict down to the budget."""
        found = []
        with os.scandir(self.directory) as entries:
            for item in entries:
                if item.name.startswith(TEMP_PREFIX):
                    unlink_quietly(item.path)  # a write or delete cut short by a crash
                elif _CHUNK_NAME.fullmatch(item.name) and item.is_file(follow_symlinks=False):
                    stat = item.stat(follow_symlinks=False)
                    found.append((stat.st_mtime_ns, item.name, padded(stat.st_size)))
        found.sort()
        with self._lock:
            for _, name, size in found:
                self._index[name] = _Entry(size, ready=True)
                self._used += size
            doomed = self._evict_until(0)
        self._delete(doomed)
        log.info("disk tier %s: %d chunks, %.3f GiB of %.3f GiB after restart", self.directory,
                 len(self._index), self._used / 1024**3, self.budget_bytes / 1024**3)

    # ------------------------------------------------------------ internals

    def _name(self, key: ChunkKey) -> str | None:
        return key.digest.hex() if key.namespace == self.namespace else None

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _reserve(self, name: str, size: int) -> _Entry | None:
        """A new in-flight entry holding ``size`` bytes of budget, the existing entry if the chunk
        is already here (or being written), or None if no room can be made."""
        if size > self.budget_bytes:
            return None
        while True:
            with self._lock:
                entry = self._index.get(name)
                if entry is not None:
                    self._index.move_to_end(name)
                    return entry if entry.ready else _IN_FLIGHT
                if self._used + size <= self.budget_bytes:
                    entry = self._index[name] = _Entry(size)
                    self._used += size
                    self.peak_used_bytes = max(self.peak_used_bytes, self._used)
                    return entry
                doomed = self._evict_until(size)
            if not doomed:
                return None  # the rest of the budget is writes in flight or files being deleted
            self._delete(doomed)

    def _evict_until(self, size: int) -> list[tuple[str | None, int]]:
        """(Lock held.) Retire least recent ready chunks until ``size`` more bytes would fit once
        they are deleted; returns them for ``_delete``."""
        victims, freed = [], 0
        for name, entry in self._index.items():  # least recent first; stops early
            if self._used - freed + size <= self.budget_bytes:
                break
            if entry.ready:
                victims.append((name, entry))
                freed += entry.size
        self._counters.evictions.inc(len(victims))
        return [self._retire(name, entry) for name, entry in victims]

    def _retire(self, name: str, entry: _Entry) -> tuple[str | None, int]:
        """(Lock held.) Phase one of a delete: out of the index, file moved to a temporary name
        (so a new chunk written under ``name`` is never deleted by mistake). Returns (path to
        delete, bytes to give back); an in-flight entry gives back nothing: its writer does."""
        del self._index[name]
        entry.removed = True
        if not entry.ready:
            return None, 0
        doomed = direct_io.temp_name(self.directory, f"del-{name}")
        try:
            os.rename(self._path(name), doomed)
        except FileNotFoundError:
            return None, entry.size
        except OSError:
            return self._path(name), entry.size
        return doomed, entry.size

    def _delete(self, doomed: list[tuple[str | None, int]]) -> None:
        """Phase two: delete the files, then give their bytes back to the budget."""
        for path, _ in doomed:
            if path is None:
                continue
            try:
                unlink_quietly(path)
            except OSError as exc:
                self._counters.errors.inc()
                log.error("disk tier: deleting %s failed: %s", path, exc)
        freed = sum(size for _, size in doomed)
        if freed:
            with self._lock:
                self._used -= freed

    def _drop(self, name: str, entry: _Entry, why: str, vanished: bool = False) -> None:
        """A chunk file that could not be served: count it, delete it (if still ours).
        ``vanished``: the file was missing, which is no fault if it was evicted meanwhile."""
        with self._lock:
            ours = self._index.get(name) is entry
            doomed = self._retire(name, entry) if ours else None
        if vanished and not ours:
            return  # evicted between the lookup and the open: an ordinary miss
        self._counters.corrupt.inc()
        if self._read_log.due():
            log.warning("disk tier: chunk %s in %s is unusable (%s); deleted, served as a miss",
                        name, self.directory, why)
        if doomed is not None:
            self._delete([doomed])

    def _read(self, name: str, max_bytes: int) -> tuple[AlignedBuffer, int] | None:
        flags = os.O_RDONLY | (direct_io.O_DIRECT if self.odirect_active else 0)
        fd = os.open(self._path(name), flags)
        try:
            return direct_io.read_file(fd, self.odirect_active, max_bytes, self._buffers.take)
        finally:
            os.close(fd)

    def _write(self, key: ChunkKey, name: str, entry: _Entry, chunk: Chunk,
               meta: ChunkMeta) -> bool:
        temp = None
        try:
            data = self._encode(key, chunk, meta, entry.size)
            temp = direct_io.write_temp(self.directory, name, data, self.odirect_active)
            if self._commit(name, entry, temp):
                self._counters.stored_bytes.inc(meta.nbytes)
                return True
            return False  # removed while in flight
        except Exception as exc:  # ENOSPC, EIO, a bad tensor: not stored, the request goes on
            if temp is not None:
                unlink_quietly(temp)
            self._abandon(name, entry)
            self._counters.errors.inc()
            if self._write_log.due():
                log.error("disk tier: writing a chunk to %s failed, not stored (logged at most "
                          "every %.0f s): %s", self.directory, LOG_INTERVAL_S, exc)
            return False

    def _encode(self, key: ChunkKey, chunk: Chunk, meta: ChunkMeta, size: int) -> memoryview:
        """Header + payload + zero padding in this thread's aligned buffer; its first ``size``
        bytes. The payload is copied first so the checksum reads it from the buffer."""
        buffer = getattr(self._write_buffers, "buffer", None)
        if buffer is None or buffer.size < size:
            buffer = self._write_buffers.buffer = AlignedBuffer(size)
        end = HEADER_SIZE + meta.nbytes
        payload = buffer.tensor[HEADER_SIZE:end]
        as_kv(meta, payload).copy_(chunk.kv)  # chunk.kv may be a strided slice
        header = encode_header(key, meta, payload)
        buffer.view[:HEADER_SIZE] = header
        buffer.tensor[end:size].zero_()  # no stale bytes of an earlier chunk on disk
        return buffer.view[:size]

    def _commit(self, name: str, entry: _Entry, temp: str) -> bool:
        """Rename the written file into place and mark it ready, unless it was removed meanwhile.
        Under the lock, so the index and the directory always agree on what ``name`` holds."""
        with self._lock:
            if not entry.removed:
                os.replace(temp, self._path(name))
                entry.ready = True
                return True
        unlink_quietly(temp)
        self._give_back(entry.size)
        return False

    def _abandon(self, name: str, entry: _Entry) -> None:
        """A write failed: take its entry out (if still in) and give its reservation back."""
        with self._lock:
            if self._index.get(name) is entry:
                del self._index[name]
            entry.removed = True
            self._used -= entry.size

    def _give_back(self, size: int) -> None:
        with self._lock:
            self._used -= size


_IN_FLIGHT = _Entry(0, ready=False, removed=True)  # "another thread is writing this chunk"


def _make_directory(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"the disk tier directory {path} cannot be created: "
                                 f"{exc.strerror}") from exc
    if not os.path.isdir(path):
        raise OSError(f"the disk tier directory {path} is not a directory")
