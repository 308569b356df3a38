"""Local disk tier: one file per chunk, a byte budget never exceeded, LRU eviction, O_DIRECT.

Layout: ``<directory>/<namespace id>/<key digest hex>``; each file is a chunk (128-byte checksummed
header, then the KV) padded to 4096 bytes. Another namespace's directory is never read, so keys of
another model or KV layout are never served. With ``local_disk_auth_key_env`` set (a directory on
a shared or network file system) files are keyed chunks (format version 2): a file that fails the
tag is a miss, counted as ``forged``, and deleted, as a corrupt one is. The tier's codec stage
(``lmcache_ext.codecs``: ``local_disk_codec``, ``local_disk_encryption_key_env``) encodes and
seals what it writes; files of any codec it knows load, whatever it writes with.

Bookkeeping is apart from the I/O: ``DiskIndex`` (``disk_index.py``, no file I/O) decides what is
stored, what is evicted and how many bytes of the budget are held; this tier does the I/O and
calls it under one short lock. Reads, writes and deletes run outside the lock, so threads do I/O
in parallel. Two phases for anything in flight:
- a write reserves its padded size first (in-flight bytes count against the budget), writes a
  temporary file, then, under the lock, renames it into place and commits it;
- eviction takes a file out of the index and renames it to a temporary name under the lock, then
  deletes it outside the lock; only then are its bytes released. A reader that opened the file
  before keeps reading it (an open fd outlives an unlink on Linux).
So bytes on disk (chunks, temporaries, files awaiting deletion) never exceed the index's
``used_bytes`` and that never exceeds the budget.

On start the index is rebuilt from the directory (name, size and mtime; least recent mtime first)
and leftover temporaries are deleted, so a restart keeps the cache and never orphans files.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence

from lmcache_ext.chunk import (
    HEADER_SIZE,
    ChunkAuth,
    ChunkCorrupt,
    ChunkForged,
    ChunkMeta,
    as_kv,
    encode_header,
)
from lmcache_ext.codecs import ChunkStage
from lmcache_ext.keys import ChunkKey
from lmcache_ext.metrics import EngineMetrics, TierCounters
from lmcache_ext.storage import direct_io
from lmcache_ext.storage.base import Chunk, ChunkLease, StorageTier, TierUsage
from lmcache_ext.storage.direct_io import TEMP_PREFIX, AlignedBuffer, unlink_quietly
from lmcache_ext.storage.disk_index import DiskEntry, DiskIndex, Reservation
from lmcache_ext.storage.log_every import LOG_INTERVAL_S, EveryInterval
from lmcache_ext.units import GIB

log = logging.getLogger(__name__)
_CHUNK_NAME = re.compile(r"[0-9a-f]{32}|[0-9a-f]{64}")  # 16- or 32-byte key digests
class DiskTier(StorageTier):
    """Chunks as files under ``directory/namespace``. Thread-safe; never raises after start.

    ``__init__`` raises OSError naming the path if the directory cannot be created or written.
    ``odirect_active`` says whether reads and writes bypass the page cache (decided once, by a
    probe, and logged loudly when ``use_odirect`` was asked for and cannot be honoured).
    ``auth``: sign and check files with these keys (format version 2); None: unkeyed.
    ``stage``: the codec stage (codec, encryption); its ``auth`` is replaced by ``auth``.
    """

    name = "disk"

    def __init__(self, directory: str, budget_bytes: int, namespace: str,
                 use_odirect: bool = False, counters: TierCounters | None = None,
                 auth: ChunkAuth | None = None, stage: ChunkStage | None = None):
        self.namespace = namespace
        self.auth = auth
        self.stage = ChunkStage(stage.codec if stage else "raw", auth,
                                stage.sealer if stage else None)
        self.directory = os.path.join(os.path.abspath(directory), namespace)
        self.budget_bytes = budget_bytes
        self._counters = counters or EngineMetrics().for_tier(self.name)
        self._index = DiskIndex(budget_bytes)  # guarded by _lock, see the module docstring
        self._lock = threading.Lock()
        self._write_buffers = threading.local()  # one reused aligned buffer per writer thread
        self._buffers = direct_io.BufferCache()  # read buffers, recycled when leases end
        self._write_log = EveryInterval(LOG_INTERVAL_S)
        self._read_log = EveryInterval(LOG_INTERVAL_S)
        started = time.perf_counter()
        _make_directory(self.directory)
        self.odirect_active, self.odirect_reason = self._decide_odirect(use_odirect)
        self._recover()
        self.startup_seconds = time.perf_counter() - started

    @property
    def peak_used_bytes(self) -> int:
        with self._lock:
            return self._index.peak_used_bytes

    # ------------------------------------------------------------ the interface

    def contains(self, key: ChunkKey) -> bool:
        name = self._name(key)
        with self._lock:
            return self._index.contains(name)

    def prefix_length(self, keys: Sequence[ChunkKey]) -> int:
        names = [self._name(key) for key in keys]
        with self._lock:
            return self._index.prefix_length(names)

    def get(self, key: ChunkKey) -> ChunkLease | None:
        """Read and verify the chunk into an aligned buffer the lease holds until released (then
        it is recycled for the next read). A missing, short or corrupt file is a miss: counted,
        and the file deleted."""
        name = self._name(key)
        with self._lock:
            entry = self._index.use(name)
        if entry is None:
            return None
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
            kv, is_view = self.stage.open(key, buffer.tensor[:nbytes])
        except ChunkCorrupt as exc:
            self._buffers.give_back(buffer)
            self._drop(name, entry, str(exc), forged=isinstance(exc, ChunkForged))
            return None
        if not is_view:  # opened into memory of its own: the buffer is free again
            self._buffers.give_back(buffer)
            return ChunkLease(Chunk(kv))
        return ChunkLease(Chunk(kv), lambda: self._buffers.give_back(buffer))

    def put(self, key: ChunkKey, chunk: Chunk) -> bool:
        """Write the chunk (synchronously: TieredStore calls this from write-behind threads).
        False if there is no room (counted as rejected) or the write failed (counted as errors)."""
        name = self._name(key)
        if name is None:
            self._counters.rejected.inc()
            return False
        try:
            meta = chunk.meta
        except Exception:  # not a KV tensor we can store: a caller bug, still never a raise
            log.exception("disk tier: cannot store %s", name)
            self._counters.errors.inc()
            return False
        encoded = None
        if not self.stage.passthrough:
            try:
                encoded = self.stage.encode(key, chunk.kv)
            except Exception:  # a KV the stage cannot store: a caller bug, still never a raise
                log.exception("disk tier: cannot encode %s", name)
                self._counters.errors.inc()
                return False
        size = HEADER_SIZE + meta.nbytes if encoded is None else len(encoded)
        reservation = self._reserve(name, size)
        if reservation.stored:
            return True  # already stored, or another thread is writing the same chunk
        if reservation.entry is None:
            self._counters.rejected.inc()
            return False
        return self._write(key, reservation.entry, chunk, meta, encoded)

    def remove(self, key: ChunkKey) -> bool:
        name = self._name(key)
        with self._lock:
            entry = self._index.remove(name)
            doomed = self._retire([entry] if entry is not None else [])
        self._delete(doomed)
        return entry is not None

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        names = [self._name(key) for key in keys]
        with self._lock:
            self._index.touch(names)

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(self._index.used_bytes, self.budget_bytes, len(self._index))

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
                    found.append((stat.st_mtime_ns, item.name, stat.st_size))
        found.sort()
        with self._lock:
            for _, name, size in found:
                self._index.adopt(name, size)
            doomed = self._evict(0)
            count, used = len(self._index), self._index.used_bytes
        self._delete(doomed)
        log.info("disk tier %s: %d chunks, %.3f GiB of %.3f GiB after restart", self.directory,
                 count, used / GIB, self.budget_bytes / GIB)

    # ------------------------------------------------------------ internals

    def _name(self, key: ChunkKey) -> str | None:
        return key.digest.hex() if key.namespace == self.namespace else None

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _reserve(self, name: str, nbytes: int) -> Reservation:
        """Reserve room for ``nbytes`` (counted padded), deleting evicted files until there is
        room or nothing more can be evicted (see ``Reservation``; never one with victims)."""
        while True:
            with self._lock:
                reservation = self._index.reserve(name, nbytes)
                self._counters.evictions.inc(len(reservation.victims))
                doomed = self._retire(reservation.victims)
            if not reservation.victims:
                return reservation
            self._delete(doomed)

    def _evict(self, size: int) -> list[tuple[str | None, DiskEntry]]:
        """(Lock held.) Evict least recent chunks until ``size`` more bytes fit once deleted."""
        victims = self._index.evict(size)
        self._counters.evictions.inc(len(victims))
        return self._retire(victims)

    def _retire(self, entries: Sequence[DiskEntry]) -> list[tuple[str | None, DiskEntry]]:
        """(Lock held.) The file side of phase one of a delete, for entries just taken out of the
        index: each ready one's file is moved to a temporary name (so a new chunk written under
        its name is never deleted by mistake). Returns (path to delete, entry) for ``_delete``;
        an in-flight entry has no file yet (its writer gives its bytes back)."""
        doomed: list[tuple[str | None, DiskEntry]] = []
        for entry in entries:
            if not entry.ready:
                continue
            path = direct_io.temp_name(self.directory, f"del-{entry.name}")
            try:
                os.rename(self._path(entry.name), path)
            except FileNotFoundError:
                path = None
            except OSError:
                path = self._path(entry.name)
            doomed.append((path, entry))
        return doomed

    def _delete(self, doomed: list[tuple[str | None, DiskEntry]]) -> None:
        """Phase two: delete the files, then release their bytes to the budget."""
        for path, _ in doomed:
            if path is None:
                continue
            try:
                unlink_quietly(path)
            except OSError as exc:
                self._counters.errors.inc()
                log.error("disk tier: deleting %s failed: %s", path, exc)
        if doomed:
            with self._lock:
                self._index.release(entry for _, entry in doomed)

    def _drop(self, name: str, entry: DiskEntry, why: str, vanished: bool = False,
              forged: bool = False) -> None:
        """A chunk file that could not be served: count it (as corrupt, or ``forged``), delete
        it (if still ours). ``vanished``: the file was missing, which is no fault if it was
        evicted meanwhile."""
        with self._lock:
            ours = self._index.remove(name, expected=entry) is not None
            doomed = self._retire([entry]) if ours else []
        if vanished and not ours:
            return  # evicted between the lookup and the open: an ordinary miss
        (self._counters.forged if forged else self._counters.corrupt).inc()
        if self._read_log.due():
            log.warning("disk tier: chunk %s in %s is %s (%s); deleted, served as a miss (logged "
                        "at most every %.0f s)", name, self.directory,
                        "forged" if forged else "unusable", why, LOG_INTERVAL_S)
        self._delete(doomed)

    def _read(self, name: str, max_bytes: int) -> tuple[AlignedBuffer, int] | None:
        flags = os.O_RDONLY | (direct_io.O_DIRECT if self.odirect_active else 0)
        fd = os.open(self._path(name), flags)
        try:
            return direct_io.read_file(fd, self.odirect_active, max_bytes, self._buffers.take)
        finally:
            os.close(fd)

    def _write(self, key: ChunkKey, entry: DiskEntry, chunk: Chunk, meta: ChunkMeta,
               encoded: bytes | bytearray | None = None) -> bool:
        temp = None
        try:
            data = self._encode(key, chunk, meta, entry.size) if encoded is None else \
                self._aligned(encoded, entry.size)
            temp = direct_io.write_temp(self.directory, entry.name, data, self.odirect_active)
            if self._commit(entry, temp):
                self._counters.stored_bytes.inc(meta.nbytes)
                return True
            return False  # removed while in flight
        except Exception as exc:  # ENOSPC, EIO, a bad tensor: not stored, the request goes on
            if temp is not None:
                unlink_quietly(temp)
            with self._lock:
                self._index.abandon(entry)
            self._counters.errors.inc()
            if self._write_log.due():
                log.error("disk tier: writing a chunk to %s failed, not stored (logged at most "
                          "every %.0f s): %s", self.directory, LOG_INTERVAL_S, exc)
            return False

    def _encode(self, key: ChunkKey, chunk: Chunk, meta: ChunkMeta, size: int) -> memoryview:
        """Header + payload + zero padding in this thread's aligned buffer; its first ``size``
        bytes. The payload is copied first so the checksum reads it from the buffer."""
        buffer = self._thread_buffer(size)
        end = HEADER_SIZE + meta.nbytes
        payload = buffer.tensor[HEADER_SIZE:end]
        as_kv(meta, payload).copy_(chunk.kv)  # chunk.kv may be a strided slice
        header = encode_header(key, meta, payload, self.auth)
        buffer.view[:HEADER_SIZE] = header
        buffer.tensor[end:size].zero_()  # no stale bytes of an earlier chunk on disk
        return buffer.view[:size]

    def _aligned(self, encoded: bytes | bytearray, size: int) -> memoryview:
        """A value the codec stage made, zero-padded in this thread's aligned buffer."""
        buffer = self._thread_buffer(size)
        buffer.view[:len(encoded)] = encoded
        buffer.tensor[len(encoded):size].zero_()
        return buffer.view[:size]

    def _thread_buffer(self, size: int) -> AlignedBuffer:
        buffer = getattr(self._write_buffers, "buffer", None)
        if buffer is None or buffer.size < size:
            buffer = self._write_buffers.buffer = AlignedBuffer(size)
        return buffer

    def _commit(self, entry: DiskEntry, temp: str) -> bool:
        """Rename the written file into place and commit it, unless it was removed meanwhile.
        Under the lock, so the index and the directory always agree on what a name holds."""
        with self._lock:
            if not entry.removed:
                os.replace(temp, self._path(entry.name))  # raises: _write abandons the entry
                return self._index.commit(entry)
        unlink_quietly(temp)
        with self._lock:
            self._index.abandon(entry)
        return False


def _make_directory(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"the disk tier directory {path} cannot be created: "
                                 f"{exc.strerror}") from exc
    if not os.path.isdir(path):
        raise OSError(f"the disk tier directory {path} is not a directory")
