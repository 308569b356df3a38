"""The connector's figures in vLLM's own KV-connector stats: its log line and its /metrics.

Each step every worker (``get_kv_connector_stats``) and the scheduler side hand vLLM an
``LMCacheExtStats``; vLLM sums the ranks' (``aggregate``), passes the sum to the scheduler side
(``update_connector_output``: the prefill speed for the cost model, the CloudWatch lines) and to
its loggers, which call ``reduce`` for the "KV Transfer metrics" log line.

``data`` is a flat dict of numbers (it crosses processes through vLLM's serializers). Names:
  counters, summed over steps and ranks:
    lookup_tokens, hit_tokens, cost_skipped_tokens, lookup_timeouts    (scheduler)
    loaded_tokens, load_s, stored_tokens, save_s                       (rank 0: every rank moves
    loaded_tokens.<tier>, stored_tokens.<tier>                          the same tokens)
    failed_loads, failed_saves, forward_tokens, forward_s              (every rank)
    <event>.<tier> for each event of ``TIER_EVENTS``                   (every rank)
  gauges, the latest value per rank, summed over ranks by ``reduce``:
    used_bytes.<tier>.r<rank>
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

# Tier events counted by the engine (metrics.TierCounters), passed on as deltas.
TIER_EVENTS = ("errors", "corrupt", "dropped", "evictions", "rejected", "promoted")
GAUGE_PREFIX = "used_bytes."
GIB = float(1 << 30)


class LMCacheExtStats(KVConnectorStats):
    """A step's (or an interval's) figures; see the module doc for the names."""

    def add(self, name: str, value: float) -> None:
        if value:
            self.data[name] = self.data.get(name, 0) + value

    def set_gauge(self, name: str, value: float) -> None:
        self.data[name] = value

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> LMCacheExtStats:
        """Sum counters; a gauge takes ``other``'s value (the later one, or another rank's)."""
        for name, value in other.data.items():
            if name.startswith(GAUGE_PREFIX):
                self.data[name] = value
            else:
                self.data[name] = self.data.get(name, 0) + value
        return self

    def is_empty(self) -> bool:
        return not self.data

    def reduce(self) -> dict[str, int | float]:
        """The interval's summary for vLLM's log line."""
        d = self.data
        lookups = d.get("lookup_tokens", 0)
        out: dict[str, int | float] = {
            "hit_rate": round(d.get("hit_tokens", 0) / lookups, 4) if lookups else 0.0,
            "hit_tokens": int(d.get("hit_tokens", 0)),
            "cost_skipped_tokens": int(d.get("cost_skipped_tokens", 0)),
            "loaded_tokens": int(d.get("loaded_tokens", 0)),
            "stored_tokens": int(d.get("stored_tokens", 0)),
            "load_ms": round(1000 * d.get("load_s", 0), 2),
            "save_ms": round(1000 * d.get("save_s", 0), 2),
            "failed_loads": int(d.get("failed_loads", 0)),
            "failed_saves": int(d.get("failed_saves", 0)),
        }
        for tier, used in used_bytes(d).items():
            out[f"used_gib.{tier}"] = round(used / GIB, 3)
        for name, value in sorted(d.items()):
            if name.split(".")[0] in TIER_EVENTS + ("loaded_tokens", "stored_tokens") and \
                    "." in name:
                out[name] = int(value)
        return out


def used_bytes(data: Mapping[str, Any]) -> dict[str, float]:
    """Bytes used per tier, summed over the ranks' latest gauges."""
    out: dict[str, float] = {}
    for name, value in data.items():
        if name.startswith(GAUGE_PREFIX):
            tier = name[len(GAUGE_PREFIX):].rsplit(".", 1)[0]
            out[tier] = out.get(tier, 0) + value
    return out

