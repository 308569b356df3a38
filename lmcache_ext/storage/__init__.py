"""Storage tiers and the tiered store over them. ``build_tiers`` turns a config into tiers."""

from __future__ import annotations

from collections.abc import Callable

from lmcache_ext.config import ConfigError, EngineConfig
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage.base import Chunk, ChunkLease, StorageTier, TierUsage
from lmcache_ext.storage.cpu import CPUTier
from lmcache_ext.storage.manager import TieredStore

__all__ = ["Chunk", "ChunkLease", "CPUTier", "StorageTier", "TierUsage", "TieredStore",
           "build_tiers"]

TierBuilder = Callable[[EngineConfig, EngineMetrics, str], StorageTier]


def _cpu(config: EngineConfig, metrics: EngineMetrics, namespace: str) -> StorageTier:
    return CPUTier(config.cpu_budget_bytes, metrics.for_tier("cpu"))


def _not_built(key: str, what: str) -> TierBuilder:
    def build(config: EngineConfig, metrics: EngineMetrics, namespace: str) -> StorageTier:
        raise ConfigError([f"{key}: {getattr(config, key)!r} asks for the {what}, which this "
                           f"build of lmcache-ext does not have yet"])
    return build


# (enabled?, builder), fastest tier first.
TIER_REGISTRY: list[tuple[Callable[[EngineConfig], bool], TierBuilder]] = [
    (lambda c: c.local_cpu, _cpu),
    (lambda c: bool(c.local_disk), _not_built("local_disk", "disk tier")),
    (lambda c: bool(c.remote_url), _not_built("remote_url", "remote tier")),
]


def build_tiers(config: EngineConfig, metrics: EngineMetrics, namespace: str) -> list[StorageTier]:
    """The tiers the config turns on, fastest first. Raises ConfigError for one that can't start."""
    return [build(config, metrics, namespace)
            for enabled, build in TIER_REGISTRY if enabled(config)]
