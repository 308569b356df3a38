"""Remote tier: a shared Redis / Valkey (or Redis Cluster) store, one cache across instances.

Values are the chunk format (``chunk.encode_header`` + raw KV): bytes from the network are data,
checked on read (header, key, checksum) and never unpickled. With ``remote_auth_key_env`` set the
values are keyed (format version 2, a BLAKE3 tag under a secret the endpoints share and the store
never sees): a value that fails the tag (written without the key, with another key, altered, or
replayed under another key's name) is a miss, counted as ``forged``, deleted, and logged at most
every 30 s. Without it anyone who can write to the store can plant KV; the start-up log says so.
The tier's codec stage (``lmcache_ext.codecs``: ``remote_serde``, ``remote_encryption_key_env``)
encodes and seals what it writes; values of any codec it knows load, whatever it writes with.
Keys are ``{remote_key_prefix}:{namespace id}:{digest hex}``. No TTL unless ``remote_ttl_s`` > 0:
the server's ``maxmemory`` + ``allkeys-lru`` policy is the capacity.

Faults degrade to misses: every call is bounded by ``remote_timeout_s`` (connect and read), redis-py
does not retry (this tier decides), and after ``ERRORS_BEFORE_BACKOFF`` consecutive failures the
tier stops calling the server for ``remote_backoff_s``, then tries again by itself. Entering and
leaving back-off are logged once each per outage.

Copies (``remote_wire``): a put sends the 128-byte header and the payload as one SET value
without joining them; a get reads the value from the socket straight into a reused, pre-faulted
buffer (one copy, where redis-py makes three) that the lease holds until released, as the disk
tier does. A raw chunk's KV, and a codec's payload not yet decoded, view that buffer: readers
copy (or decode) out of it within the lease (the tiered store and the engine do) and nobody
writes to it; a sealed value opens into memory of its own and its buffer is reused at once. A
value a cluster redirect sends elsewhere is read by redis-py (which follows the redirect).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmcache_ext.chunk import (
    HEADER_SIZE,
    ChunkAuth,
    ChunkCorrupt,
    ChunkForged,
    encode_header,
    payload_view,
)
from lmcache_ext.codecs import RAW, ChunkSealer, ChunkStage
from lmcache_ext.config import ConfigError, EngineConfig, default_of
from lmcache_ext.keys import ChunkKey
from lmcache_ext.metrics import EngineMetrics, TierCounters
from lmcache_ext.storage import remote_wire
from lmcache_ext.storage.auth import chunk_auth, chunk_sealer
from lmcache_ext.storage.base import Chunk, ChunkLease, StorageTier, TierUsage
from lmcache_ext.storage.direct_io import AlignedBuffer, BufferCache
from lmcache_ext.storage.log_every import LOG_INTERVAL_S, EveryInterval
from lmcache_ext.storage.redis_url import RedisTarget, parse_redis_url

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import RedisCluster
    from redis.exceptions import AskError, MovedError
    from redis.retry import Retry
except ImportError:  # the tier is optional: the builder turns this into a config error
    redis = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

ERRORS_BEFORE_BACKOFF = 3
MAX_CONNECTIONS = 32  # engine threads + write-behind workers, with room to spare
UNKNOWN = -1  # used_bytes / num_chunks when the server cannot be asked



def _silence_frombuffer_warning() -> None:
    """The bytes hiredis returns (a value read after a cluster redirect) are immutable and torch
    warns that a tensor over them is not writable. Chunks from this tier are only read (see the
    module docstring), so that is noise. torch gives that warning once per process
    (TORCH_WARN_ONCE): spend it here, at import, out of sight, rather than install a filter
    (pytest and others reset filters) or copy every value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0", dtype=torch.uint8)


_silence_frombuffer_warning()


@dataclass(frozen=True)
class RemoteSettings:
    """Everything the tier needs from the config, resolved (password and chunk keys included).
    ``auth`` None: unkeyed values (format version 1). ``codec``: what puts encode with (a
    ``codecs.CODECS`` name); ``sealer`` None: values in the clear."""

    target: RedisTarget
    key_prefix: str = default_of("remote_key_prefix")
    timeout_s: float = default_of("remote_timeout_s")
    backoff_s: float = default_of("remote_backoff_s")
    ttl_s: float = default_of("remote_ttl_s")
    max_connections: int = MAX_CONNECTIONS
    auth: ChunkAuth | None = None
    codec: str = RAW
    sealer: ChunkSealer | None = None

    @staticmethod
    def from_config(config: EngineConfig, env: Mapping[str, str] | None = None) -> RemoteSettings:
        """Raises ConfigError naming the key for a URL, password or key env var that does not
        work."""
        env = os.environ if env is None else env
        try:
            target = parse_redis_url(config.remote_url or "")
        except ValueError as exc:
            raise ConfigError([f"remote_url: {config.remote_url!r} is invalid: {exc}"]) from exc
        if config.remote_password_env:
            if config.remote_password_env not in env:
                raise ConfigError([f"remote_password_env: {config.remote_password_env!r} names "
                                   f"an env var that is not set"])
            target = target.with_password(env[config.remote_password_env])
        return RemoteSettings(target, config.remote_key_prefix, config.remote_timeout_s,
                              config.remote_backoff_s, config.remote_ttl_s,
                              auth=chunk_auth(config, "remote", env), codec=config.remote_codec,
                              sealer=chunk_sealer(config, "remote", env))


class _Breaker:
    """Counts consecutive failures; past the threshold, refuses calls for ``backoff_s``."""

    def __init__(self, backoff_s: float, what: str):
        self._backoff_s = backoff_s
        self._what = what
        self._lock = threading.Lock()
        self._failures = 0
        self._until = 0.0
        self._degraded = False  # logged "backing off" and not yet "recovered"

    @property
    def backing_off(self) -> bool:
        with self._lock:
            return time.monotonic() < self._until

    def allow(self) -> bool:
        with self._lock:
            return time.monotonic() >= self._until

    def failure(self, exc: BaseException) -> None:
        with self._lock:
            self._failures += 1
            if self._failures < ERRORS_BEFORE_BACKOFF:
                return
            self._until = time.monotonic() + self._backoff_s
            if self._degraded:
                return
            self._degraded = True
        log.warning("remote tier %s: %d errors in a row (last: %s); serving misses and not "
                    "calling it for %.1f s", self._what, ERRORS_BEFORE_BACKOFF, exc,
                    self._backoff_s)

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            recovered, self._degraded = self._degraded, False
        if recovered:
            log.warning("remote tier %s: reachable again", self._what)


class RemoteTier(StorageTier):
    """Thread-safe; every method returns a miss / False on any failure and never hangs longer
    than about ``timeout_s`` (one call) or at all while backing off."""

    name = "remote"
    local_index = False  # every question is a round trip to the server

    def __init__(self, settings: RemoteSettings, counters: TierCounters | None = None,
                 namespace: str = ""):
        if redis is None:
            raise ConfigError(["remote_url: the remote tier needs redis-py: "
                               "pip install 'lmcache-ext[redis]'"])
        self.settings = settings
        self._counters = counters or EngineMetrics().for_tier(self.name)
        self._breaker = _Breaker(settings.backoff_s, settings.target.display())
        self._lock = threading.Lock()
        self._client: Any = None
        self._last_usage = TierUsage(UNKNOWN, 0, UNKNOWN)
        self._ttl_ms = int(settings.ttl_s * 1000)
        self._bad_value_log = EveryInterval(LOG_INTERVAL_S)
        self._stage = ChunkStage(settings.codec, settings.auth, settings.sealer)
        self._buffers = BufferCache()  # values read, recycled when their leases end
        target = settings.target
        log.info("remote tier: %s (cluster: %s, TLS: %s, timeout %.2f s, back-off %.1f s, "
                 "TTL %s, namespace %s, chunks %s, codec %s, %s)", target.display(),
                 target.cluster, target.tls, settings.timeout_s, settings.backoff_s,
                 f"{settings.ttl_s:g} s" if self._ttl_ms else "none", namespace or "-",
                 "keyed" if settings.auth else "UNAUTHENTICATED", settings.codec,
                 "encrypted" if settings.sealer else "in the clear")

    @property
    def backing_off(self) -> bool:
        """True while the tier refuses to call the server after repeated errors."""
        return self._breaker.backing_off

    def key_name(self, key: ChunkKey) -> bytes:
        return f"{self.settings.key_prefix}:{key.namespace}:{key.digest.hex()}".encode()

    # ------------------------------------------------------------------ the interface

    def contains(self, key: ChunkKey) -> bool:
        ok, count = self._call(lambda c: c.exists(self.key_name(key)))
        return ok and bool(count)

    def prefix_length(self, keys: Sequence[ChunkKey]) -> int:
        """One round trip (a pipeline of EXISTS) for the whole batch."""
        if not keys:
            return 0
        ok, found = self._call(lambda c: self._exists_each(c, [self.key_name(k) for k in keys]))
        if not ok:
            return 0
        for index, present in enumerate(found):
            if not present:
                return index
        return len(keys)

    def get(self, key: ChunkKey) -> ChunkLease | None:
        name = self.key_name(key)
        ok, value = self._call(lambda c: self._get(c, name))
        if not ok or value is None:
            return None
        data, buffer = value
        try:
            if data.numel() < HEADER_SIZE:
                raise ChunkCorrupt(f"{data.numel()} bytes is shorter than a header")
            kv, is_view = self._stage.open(key, data)
        except ChunkCorrupt as exc:
            self._give_back(buffer)
            forged = isinstance(exc, ChunkForged)
            (self._counters.forged if forged else self._counters.corrupt).inc()
            if self._bad_value_log.due():
                log.warning("remote tier: %s is %s (%s); deleted, served as a miss (logged at "
                            "most every %.0f s; see the tier's corrupt and forged counts)",
                            name.decode(), "forged" if forged else "corrupt", exc,
                            LOG_INTERVAL_S)
            self._call(lambda c: c.delete(name))
            return None
        if not is_view or buffer is None:  # nothing to give back when the lease ends
            self._give_back(buffer)
            return ChunkLease(Chunk(kv))
        return ChunkLease(Chunk(kv), lambda: self._give_back(buffer))

    def put(self, key: ChunkKey, chunk: Chunk) -> bool:
        try:
            if self._stage.passthrough:
                kv = chunk.kv if chunk.kv.device.type == "cpu" else chunk.kv.cpu()
                payload = payload_view(kv)  # a copy only when the KV is strided
                header = encode_header(key, chunk.meta, payload, self.settings.auth)
                value = memoryview(payload.numpy())
            else:  # encoded and / or sealed: one value of its own
                header, value = b"", memoryview(self._stage.encode(key, chunk.kv))
        except Exception:
            log.exception("remote tier: cannot encode a chunk; not stored")
            self._counters.errors.inc()
            return False
        ok, _ = self._call(lambda c: self._set(c, self.key_name(key), header, value))
        if ok:
            self._counters.stored_bytes.inc(chunk.meta.nbytes)
        return ok

    def remove(self, key: ChunkKey) -> bool:
        ok, count = self._call(lambda c: c.delete(self.key_name(key)))
        return ok and bool(count)

    def usage(self) -> TierUsage:
        """``used_bytes``: the server's ``used_memory`` (all its data, not only ours);
        ``capacity_bytes``: its ``maxmemory`` (0 = unbounded); ``num_chunks``: its key count
        (DBSIZE). While the server cannot be asked: the last answer, or ``UNKNOWN`` (-1)."""
        ok, usage = self._call(self._ask_usage)
        if ok:
            self._last_usage = usage
        return self._last_usage

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                log.debug("remote tier: error while closing", exc_info=True)

    # -------------------------------------------------------------- internals

    def _call(self, fn: Callable[[Any], Any]) -> tuple[bool, Any]:
        """(ok, result) of ``fn(client)``; (False, None) while backing off or on any error."""
        if not self._breaker.allow():
            return False, None
        try:
            result = fn(self._connect())
        except Exception as exc:  # network, protocol, TLS, auth: all the same miss for callers
            self._counters.errors.inc()
            self._breaker.failure(exc)
            return False, None
        self._breaker.success()
        return True, result

    def _connect(self) -> Any:
        """The client, made on first use (a cluster client talks to the server when made)."""
        with self._lock:
            if self._client is None:
                self._client = _CLIENTS[self.settings.target.cluster](self.settings)
            return self._client

    def _set(self, client: Any, name: bytes, header: bytes, payload: memoryview) -> None:
        command = remote_wire.set_command(name, header, payload, self._ttl_ms)
        try:
            remote_wire.send(self._pool_for(client, name), command)
        except (MovedError, AskError):
            # Slots moved: let the cluster client follow the redirect and refresh its map.
            # Rare, so one join of the value is fine here.
            client.set(name, b"".join([header, payload]), px=self._ttl_ms or None)

    def _get(self, client: Any, name: bytes) -> tuple[torch.Tensor, AlignedBuffer | None] | None:
        """The value of ``name`` as flat bytes and the reused buffer holding them (None when
        redis-py read them), or None when the store has no such key."""
        try:
            read = remote_wire.get_into(self._pool_for(client, name), name, self._buffers.take)
        except (MovedError, AskError):  # as in ``_set``: redis-py follows the redirect
            data = client.get(name)
            if data is None:
                return None
            return (torch.frombuffer(data, dtype=torch.uint8) if data
                    else torch.empty(0, dtype=torch.uint8)), None
        if read is None:
            return None
        buffer, nbytes = read
        return buffer.tensor[:nbytes], buffer

    def _pool_for(self, client: Any, name: bytes) -> Any:
        """The connection pool of the server that holds ``name`` (a cluster: its slot's node)."""
        if not self.settings.target.cluster:
            return client.connection_pool
        return client.get_redis_connection(client.get_node_from_key(name)).connection_pool

    def _give_back(self, buffer: AlignedBuffer | None) -> None:
        if buffer is not None:
            self._buffers.give_back(buffer)

    @staticmethod
    def _exists_each(client: Any, names: list[bytes]) -> list[int]:
        # One EXISTS per key: in a cluster the keys live in different slots, and the cluster
        # pipeline sends each node its share in one go.
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        return pipe.execute()

    def _ask_usage(self, client: Any) -> TierUsage:
        if not self.settings.target.cluster:
            return _node_usage(client)
        # Each primary holds its share of the slots: add them up.
        shares = [_node_usage(client.get_redis_connection(node))
                  for node in client.get_primaries()]
        return TierUsage(sum(s.used_bytes for s in shares), sum(s.capacity_bytes for s in shares),
                         sum(s.num_chunks for s in shares))


def _node_usage(client: Any) -> TierUsage:
    memory = client.info("memory")
    return TierUsage(int(memory["used_memory"]), int(memory["maxmemory"]), int(client.dbsize()))


def _common_kwargs(settings: RemoteSettings) -> dict[str, Any]:
    target = settings.target
    kwargs: dict[str, Any] = dict(
        username=target.username, password=target.password,
        socket_timeout=settings.timeout_s, socket_connect_timeout=settings.timeout_s,
        retry=Retry(NoBackoff(), 0),  # no hidden retries: the tier's back-off decides
    )
    if target.tls:
        kwargs.update(ssl_ca_certs=target.ssl_ca_certs, ssl_cert_reqs=target.ssl_cert_reqs,
                      ssl_check_hostname=target.ssl_cert_reqs == "required")
    return kwargs


def _standalone(settings: RemoteSettings) -> Any:
    target = settings.target
    kwargs = _common_kwargs(settings)
    if target.tls:
        kwargs["connection_class"] = redis.SSLConnection
    # Blocking pool: more threads than connections wait (bounded) instead of failing.
    pool = redis.BlockingConnectionPool(
        host=target.host, port=target.port, db=target.db, max_connections=settings.max_connections,
        timeout=settings.timeout_s, **kwargs)
    return redis.Redis(connection_pool=pool)


def _cluster(settings: RemoteSettings) -> Any:
    target = settings.target
    return RedisCluster(
        host=target.host, port=target.port, ssl=target.tls,
        max_connections=settings.max_connections,
        **_common_kwargs(settings))


_CLIENTS: dict[bool, Callable[[RemoteSettings], Any]] = {False: _standalone, True: _cluster}


def build_remote_tier(config: EngineConfig, metrics: EngineMetrics, namespace: str) -> RemoteTier:
    """The registry's builder: a config error for a bad URL or password env var, else the tier
    (which does not connect yet: a server down at start is a miss, not a failed start)."""
    return RemoteTier(RemoteSettings.from_config(config), metrics.for_tier("remote"), namespace)
