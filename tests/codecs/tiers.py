"""Helpers: a disk or a Redis tier with a given codec stage, and its stored values' raw bytes."""

from __future__ import annotations

import os

from lmcache_ext.codecs import ChunkSealer, ChunkStage
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage import DiskTier
from lmcache_ext.storage.redis_url import parse_redis_url
from lmcache_ext.storage.remote import RemoteSettings, RemoteTier
from tests.helpers import key

KINDS = ["disk", "remote"]
NAMESPACE = key(0).namespace


class Place:
    """Where a test's tiers keep their bytes: a directory, or a real redis-server."""

    def __init__(self, kind: str, tmp_path, redis_server):
        self.kind = kind
        self.directory = str(tmp_path / "disk")
        self.server = redis_server if kind == "remote" else None

    def tier(self, codec: str = "raw", sealer: ChunkSealer | None = None,
             metrics: EngineMetrics | None = None):
        counters = (metrics or EngineMetrics()).for_tier(self.kind)
        if self.kind == "disk":
            return DiskTier(self.directory, 1 << 24, NAMESPACE, False, counters,
                            stage=ChunkStage(codec, sealer=sealer))
        settings = RemoteSettings(parse_redis_url(self.server.url), codec=codec, sealer=sealer)
        return RemoteTier(settings, counters)

    def stored(self, tier, n: int) -> bytes:
        if self.kind == "disk":
            with open(os.path.join(tier.directory, key(n).digest.hex()), "rb") as handle:
                return handle.read()
        return self.server.client().get(tier.key_name(key(n)))

    def plant(self, tier, n: int, value: bytes) -> None:
        """Write ``value`` as key n's stored bytes behind the tier's back (an attacker, another
        writer), keeping the tier's index entry."""
        if self.kind == "disk":
            with open(os.path.join(tier.directory, key(n).digest.hex()), "r+b") as handle:
                handle.truncate(0)
                handle.write(value)
            return
        self.server.client().set(tier.key_name(key(n)), value)


def counter(metrics: EngineMetrics, kind: str, name: str) -> float:
    return metrics.value(f"tier_{name}_total", tier=kind)
