"""The connector's figures in vLLM's own KV-connector stats: its log line and its /metrics.

Each step every worker (``get_kv_connector_stats``) and the scheduler side hand vLLM an
``LMCacheExtStats``; vLLM sums the ranks' (``aggregate``), passes the sum to the scheduler side
(``update_connector_output``: the prefill speed for the cost model, the CloudWatch lines) and to
its loggers, which call ``reduce`` for the "KV Transfer metrics" log line and our
``LMCacheExtPromMetrics`` for ``/metrics``. The scheduler side also writes one CloudWatch EMF line
per interval (``emf_metrics``; ``emf.py`` makes the line).

``data`` is a flat dict of numbers (it crosses processes through vLLM's serializers). Names:
  counters, summed over steps and ranks:
    lookup_tokens, hit_tokens, cost_skipped_tokens, lookup_timeouts    (scheduler)
    prefill_step_saved_tokens   (scheduler: saves planned by chunked-prefill steps before the
                                 prompt's last one; each step saves the chunks it completed)
    skipped_save_tokens         (rank 0: chunks not saved, no staging buffer came back in time
                                 from a first tier that does I/O; see worker_saves)
    loaded_tokens, load_s, stored_tokens, save_s, store_s              (rank 0: every rank moves
    loaded_tokens.<tier>, stored_tokens.<tier>                          the same tokens)
    failed_loads, failed_saves, forward_tokens, forward_s              (every rank)
    <event>.<tier> for each event of ``TIER_EVENTS``                   (every rank)
  gauges, the latest value per rank, summed over ranks by ``reduce``:
    used_bytes.<tier>.r<rank>
    pinned_bytes.r<rank>     (bytes the open sessions pin in the CPU tier)
    staging_bytes.r<rank>    (bytes of staging buffers in use; 0 when nothing is in flight)
    pinned_requests.r<rank>  (requests holding a pin; 0 when nothing is in flight)
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

# Tier events counted by the engine (metrics.TierCounters), passed on as deltas.
TIER_EVENTS = ("errors", "corrupt", "forged", "dropped", "evictions", "rejected", "promoted")
GAUGE_PREFIX = "used_bytes."
# Levels beside the tiers' (not per tier): what a long run watches for leaks.
LEVELS = ("pinned_bytes", "staging_bytes", "pinned_requests")
GAUGE_PREFIXES = (GAUGE_PREFIX, *(f"{level}." for level in LEVELS))
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
            if name.startswith(GAUGE_PREFIXES):
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
            "prefill_step_saved_tokens": int(d.get("prefill_step_saved_tokens", 0)),
            "load_ms": round(1000 * d.get("load_s", 0), 2),
            "save_ms": round(1000 * d.get("save_s", 0), 2),
            "store_ms": round(1000 * d.get("store_s", 0), 2),
            "failed_loads": int(d.get("failed_loads", 0)),
            "failed_saves": int(d.get("failed_saves", 0)),
            "skipped_save_tokens": int(d.get("skipped_save_tokens", 0)),
        }
        for tier, used in used_bytes(d).items():
            out[f"used_gib.{tier}"] = round(used / GIB, 3)
        out.update(levels(d))
        for name, value in sorted(d.items()):
            if name.split(".")[0] in TIER_EVENTS + ("loaded_tokens", "stored_tokens") and \
                    "." in name:
                out[name] = int(value)
        return out


class StatsTally:
    """One rank's figures since vLLM last took them, counted from vLLM's thread, the loader
    and the saver. Thread-safe. ``moved`` is set by each load and save: the tiers are then
    sampled at the next ``take`` (a benign race: at worst one sample later)."""

    def __init__(self) -> None:
        self._stats = LMCacheExtStats()
        self._lock = threading.Lock()
        self.moved = False

    def add(self, name: str, value: float) -> None:
        with self._lock:
            self._stats.add(name, value)

    def set_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._stats.set_gauge(name, value)

    def reset(self) -> None:
        with self._lock:
            self._stats = LMCacheExtStats()

    def take(self) -> LMCacheExtStats | None:
        """The figures counted since the last call, or None if there are none."""
        with self._lock:
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, LMCacheExtStats()
        return stats


# A rank's per-request stages, timed where they run (``StageClock``).
STAGES = ("lookup", "pin", "read", "scatter", "load_other")


class StageClock:
    """Seconds one rank has spent in each of ``STAGES`` since it started: "lookup" (a lookup's
    spans and index reads), "pin" (pinning what it found), "read" (a load's tier reads, leases
    included), "scatter" (copying the chunks into vLLM's blocks; on a GPU the queuing of the
    copies), "load_other" (the rest of a load: spans, slots, the pipeline). Monotonic totals,
    cheap to keep (a few clock reads a request), for benchmarks that difference two
    ``snapshot``s around a request (``benchmarks/vllm_ttft.py``). Thread-safe."""

    def __init__(self) -> None:
        self._totals = dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._totals[stage] += seconds

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._totals)


def used_bytes(data: Mapping[str, Any]) -> dict[str, float]:
    """Bytes used per tier, summed over the ranks' latest gauges."""
    out: dict[str, float] = {}
    for name, value in data.items():
        if name.startswith(GAUGE_PREFIX):
            tier = name[len(GAUGE_PREFIX):].rsplit(".", 1)[0]
            out[tier] = out.get(tier, 0) + value
    return out


def levels(data: Mapping[str, Any]) -> dict[str, float]:
    """Each of ``LEVELS``, summed over the ranks' latest gauges (absent: not reported yet)."""
    out: dict[str, float] = {}
    for name, value in data.items():
        level = name.rsplit(".", 1)[0]
        if level in LEVELS:
            out[level] = out.get(level, 0) + value
    return out


def merge_into(total: dict[str, float], data: Mapping[str, float]) -> None:
    """``aggregate``'s rule on plain dicts: counters add up, gauges take the newer value."""
    LMCacheExtStats(data=total).aggregate(LMCacheExtStats(data=dict(data)))


# ------------------------------------------------------------------ CloudWatch (EMF) lines

# counter name in ``data`` -> (EMF metric name, unit)
_EMF_TOTALS = {
    "lookup_tokens": ("LookupTokens", "Count"), "hit_tokens": ("HitTokens", "Count"),
    "cost_skipped_tokens": ("CostSkippedTokens", "Count"),
    "loaded_tokens": ("LoadedTokens", "Count"), "stored_tokens": ("StoredTokens", "Count"),
    "load_s": ("LoadSeconds", "Seconds"), "save_s": ("SaveSeconds", "Seconds"),
    "store_s": ("StoreSeconds", "Seconds"),
    "failed_loads": ("FailedLoads", "Count"), "failed_saves": ("FailedSaves", "Count"),
    "lookup_timeouts": ("LookupTimeouts", "Count"),
    "prefill_step_saved_tokens": ("PrefillStepSavedTokens", "Count"),
    "skipped_save_tokens": ("SkippedSaveTokens", "Count"),
}
_EMF_PER_TIER = {"loaded_tokens": "LoadedTokens", "stored_tokens": "StoredTokens",
                 **{event: event.capitalize() for event in TIER_EVENTS}}


def emf_metrics(data: Mapping[str, float]) -> dict[str, tuple[float, str]]:
    """An interval's figures as EMF metrics: the totals (always, 0 when nothing happened),
    HitRate in percent of the prompt tokens looked up, per tier ``<Metric>.<tier>``, and the
    levels (``PinnedBytes``, ``StagingBytes``, ``PinnedRequests``) once a rank has sent them."""
    out: dict[str, tuple[float, str]] = {}
    lookups = data.get("lookup_tokens", 0)
    out["HitRate"] = (round(100 * data.get("hit_tokens", 0) / lookups, 3) if lookups else 0.0,
                      "Percent")
    for name, (metric, unit) in _EMF_TOTALS.items():
        out[metric] = (float(data.get(name, 0)), unit)
    for name, value in sorted(data.items()):
        event, _, tier = name.partition(".")
        if tier and event in _EMF_PER_TIER:
            out[f"{_EMF_PER_TIER[event]}.{tier}"] = (float(value), "Count")
    for tier, used in used_bytes(dict(data)).items():
        out[f"UsedBytes.{tier}"] = (float(used), "Bytes")
    for name, level in levels(data).items():
        unit = "Count" if name == "pinned_requests" else "Bytes"
        out["".join(part.capitalize() for part in name.split("_"))] = (float(level), unit)
    return out


# ------------------------------------------------------------------ vLLM's /metrics

class LMCacheExtPromMetrics(KVConnectorPromMetrics):
    """The figures as Prometheus series in vLLM's ``/metrics`` (``vllm:lmcache_ext_*``),
    labelled like vLLM's own (model name, engine) and by tier where they are per tier."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._counter_cls(name=f"vllm:lmcache_ext_{metric_name(name)}",
                                    documentation=text, labelnames=list(labelnames))
            for name, text in PROM_TOTALS.items()}
        tier_labels = [*labelnames, "tier"]
        self._tier_counters = {
            name: self._counter_cls(name=f"vllm:lmcache_ext_tier_{name}",
                                    documentation=text, labelnames=tier_labels)
            for name, text in PROM_PER_TIER.items()}
        self._used = self._gauge_cls(name="vllm:lmcache_ext_tier_used_bytes",
                                     documentation="Bytes held by the tier, all ranks.",
                                     labelnames=tier_labels, multiprocess_mode="mostrecent")
        self._levels = {
            level: self._gauge_cls(name=f"vllm:lmcache_ext_{level}", documentation=text,
                                   labelnames=list(labelnames), multiprocess_mode="mostrecent")
            for level, text in PROM_LEVELS.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = [str(v) for v in self.per_engine_labelvalues.get(engine_idx, [])]
        for name, value in transfer_stats_data.items():
            event, _, tier = name.partition(".")
            if name in self._counters and value > 0:
                self._counters[name].labels(*labels).inc(value)
            elif tier and event in self._tier_counters and value > 0:
                self._tier_counters[event].labels(*labels, tier).inc(value)
        for tier, used in used_bytes(transfer_stats_data).items():
            self._used.labels(*labels, tier).set(used)
        for level, value in levels(transfer_stats_data).items():
            self._levels[level].labels(*labels).set(value)


def metric_name(name: str) -> str:
    """``load_s`` -> ``load_seconds`` (Prometheus spells units out)."""
    return name[:-2] + "_seconds" if name.endswith("_s") else name


PROM_TOTALS = {
    "lookup_tokens": "Prompt tokens looked up beyond vLLM's own prefix cache.",
    "hit_tokens": "Tokens offered to vLLM from lmcache-ext's tiers.",
    "cost_skipped_tokens": "Tokens held but recomputed: loading them would take longer.",
    "loaded_tokens": "Tokens of KV loaded into vLLM's blocks.",
    "stored_tokens": "Tokens of KV newly stored.",
    "load_s": "Time spent loading KV in the step.",
    "save_s": "Time spent saving KV in the step (copying it out of vLLM's blocks).",
    "store_s": "Time from a save's copy-out to its tier writes done, off the step.",
    "failed_loads": "Loads that could not fill every block (recomputed by vLLM), all ranks.",
    "failed_saves": "Saves that failed (skipped), all ranks.",
    "skipped_save_tokens": "Tokens not saved: the first tier (disk or Redis alone) still held "
                           "every staging buffer after the step's wait.",
    "lookup_timeouts": "Lookups a worker rank did not answer in time (served as misses).",
}
PROM_LEVELS = {
    "pinned_bytes": "Bytes the open sessions pin in the CPU tier, all ranks.",
    "staging_bytes": "Bytes of staging buffers in use, all ranks.",
    "pinned_requests": "Requests holding a pin on their chunks, awaiting their load, all ranks "
                       "(one that stays above 0 while idle is a leak).",
}
assert set(PROM_LEVELS) == set(LEVELS)
PROM_PER_TIER = {
    "loaded_tokens": "Tokens loaded from the tier (rank 0's count).",
    "stored_tokens": "Tokens stored into the tier (rank 0's count, from bytes).",
    **{event: f"Chunk events on the tier: {event}, all ranks." for event in TIER_EVENTS},
}
