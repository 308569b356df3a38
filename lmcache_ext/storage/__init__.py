"""Storage tiers and the tiered store over them. ``build_tiers`` turns a config into tiers."""

from __future__ import annotations

from collections.abc import Callable

from lmcache_ext.config import ConfigError, EngineConfig
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage.auth import chunk_stage
from lmcache_ext.storage.base import Chunk, ChunkLease, StorageTier, TierUsage
from lmcache_ext.storage.cpu import CPUTier
from lmcache_ext.storage.disk import DiskTier
from lmcache_ext.storage.manager import TieredStore

__all__ = ["Chunk", "ChunkLease", "CPUTier", "DiskTier", "StorageTier", "TierUsage", "TieredStore",
           "build_tiers"]

TierBuilder = Callable[[EngineConfig, EngineMetrics, str], StorageTier]


def _cpu(config: EngineConfig, metrics: EngineMetrics, namespace: str) -> StorageTier:
    return CPUTier(config.cpu_budget_bytes, metrics.for_tier("cpu"))


def _disk(config: EngineConfig, metrics: EngineMetrics, namespace: str) -> StorageTier:
    stage = chunk_stage(config, "disk")  # a ConfigError naming the key for an unset env var
    try:
        return DiskTier(config.disk_dir, config.disk_budget_bytes, namespace, config.use_odirect,
                        metrics.for_tier("disk"), stage.auth, stage)
    except OSError as exc:
        raise ConfigError([f"local_disk: {config.local_disk!r} (directory {config.disk_dir}) "
                           f"cannot be used for the disk tier: {exc}"]) from exc


def _remote(config: EngineConfig, metrics: EngineMetrics, namespace: str) -> StorageTier:
    # Imported here: redis-py is an optional extra, needed only when remote_url is set.
    from lmcache_ext.storage.remote import build_remote_tier
    return build_remote_tier(config, metrics, namespace)


# (enabled?, builder), fastest tier first.
TIER_REGISTRY: list[tuple[Callable[[EngineConfig], bool], TierBuilder]] = [
    (lambda c: c.local_cpu, _cpu),
    (lambda c: bool(c.local_disk), _disk),
    (lambda c: bool(c.remote_url), _remote),
]


def build_tiers(config: EngineConfig, metrics: EngineMetrics, namespace: str) -> list[StorageTier]:
    """The tiers the config turns on, fastest first. Raises ConfigError for one that can't start."""
    return [build(config, metrics, namespace)
            for enabled, build in TIER_REGISTRY if enabled(config)]
