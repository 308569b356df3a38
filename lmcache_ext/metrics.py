"""Prometheus metrics: every tier transition is counted so tests, benchmarks and operators see it.

Each engine owns its own registry (several engines in one process never clash). Tiers take a
``TierCounters``: the same metrics bound to the tier's label, so tier code only calls ``.inc()``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "lmcache_ext"
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class TierCounters:
    """One tier's counters (prometheus children bound to ``tier=<name>``)."""

    hits: Counter  # chunks served from this tier
    stored_bytes: Counter
    retrieved_bytes: Counter
    evictions: Counter
    rejected: Counter  # puts refused for lack of room (everything else pinned)
    corrupt: Counter  # chunks whose header or checksum failed; each one was a miss
    forged: Counter  # well-formed chunks a keyed tier refused (tag, key, replay); each a miss
    errors: Counter  # I/O or network failures; each one was a miss or an unstored chunk
    dropped: Counter  # write-behinds dropped because this tier's queue was full
    promoted: Counter  # chunks found here and copied up to a faster tier


class EngineMetrics:
    """All metrics of one engine, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.lookups = Counter(f"{PREFIX}_lookups", "Prefix lookups.", registry=r)
        self.requested_tokens = Counter(
            f"{PREFIX}_lookup_requested_tokens", "Prompt tokens looked up.", registry=r)
        self.hit_tokens = Counter(
            f"{PREFIX}_lookup_hit_tokens", "Prompt tokens found in a tier.", registry=r)
        self.retrieved_tokens = Counter(
            f"{PREFIX}_retrieved_tokens", "Tokens of KV copied out to callers.", registry=r)
        self.stored_tokens = Counter(
            f"{PREFIX}_stored_tokens", "Tokens of KV newly stored.", registry=r)
        self.store_seconds = Histogram(
            f"{PREFIX}_store_seconds", "Time of engine.store calls.", buckets=_LATENCY_BUCKETS,
            registry=r)
        self.retrieve_seconds = Histogram(
            f"{PREFIX}_retrieve_seconds", "Time of engine.retrieve calls.",
            buckets=_LATENCY_BUCKETS, registry=r)
        labels = ["tier"]
        self._tier_counters = {
            name: Counter(f"{PREFIX}_tier_{name}", text, labels, registry=r)
            for name, text in (
                ("hits", "Chunks served from the tier."),
                ("stored_bytes", "Bytes written into the tier."),
                ("retrieved_bytes", "Bytes read from the tier."),
                ("evictions", "Chunks evicted from the tier."),
                ("rejected", "Puts refused: no room that could be freed."),
                ("corrupt", "Chunks that failed their header or checksum (served as misses)."),
                ("forged", "Well-formed chunks whose keyed tag failed: unkeyed, signed with "
                           "another key, altered or replayed (served as misses, deleted)."),
                ("errors", "I/O or network errors (served as misses)."),
                ("dropped", "Write-behinds dropped because the tier's queue was full."),
                ("promoted", "Chunks found in the tier and copied to a faster one."),
            )
        }
        self._used = Gauge(f"{PREFIX}_tier_used_bytes", "Bytes held by the tier.", labels,
                           registry=r)
        self._capacity = Gauge(f"{PREFIX}_tier_capacity_bytes", "Byte budget of the tier.",
                               labels, registry=r)
        self._sessions: SessionMetrics | None = None
        self._sessions_lock = threading.Lock()

    @property
    def sessions(self) -> SessionMetrics:
        """The session metrics in this registry, made on first use: one set per engine, shared
        by whatever keeps sessions over it."""
        with self._sessions_lock:
            if self._sessions is None:
                self._sessions = SessionMetrics(self.registry)
            return self._sessions

    def for_tier(self, tier: str) -> TierCounters:
        bound = {name: c.labels(tier=tier) for name, c in self._tier_counters.items()}
        return TierCounters(**bound)

    def watch_usage(self, tier: str, used: Callable[[], float], capacity: float) -> None:
        """Report a tier's bytes in use on every scrape."""
        self._used.labels(tier=tier).set_function(used)
        self._capacity.labels(tier=tier).set(capacity)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample (``_total`` names for counters); 0.0 if never set. A tier
        counter's is read from that counter alone (the connector samples them after every
        load: a scan of the whole registry cost ~1 ms a step)."""
        sample = f"{PREFIX}_{name}"
        counter = self._tier_counters.get(name.removeprefix("tier_").removesuffix("_total"))
        if counter is None or not name.startswith("tier_"):
            return self.registry.get_sample_value(sample, labels) or 0.0
        for family in counter.collect():
            for found in family.samples:
                if found.name == sample and found.labels == labels:
                    return found.value
        return 0.0

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (for a /metrics endpoint)."""
        return generate_latest(self.registry)


class RunningAverage:
    """An exponentially weighted running average of observations, e.g. a measured speed.

    ``weight`` is the share of the newest observation (0 < weight <= 1); the first observation
    is taken as is. Thread-safe; ``value`` is None until something was observed.
    """

    def __init__(self, weight: float):
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.weight = weight
        self._value: float | None = None
        self._lock = threading.Lock()

    @property
    def value(self) -> float | None:
        with self._lock:
            return self._value

    def observe(self, value: float) -> None:
        with self._lock:
            old = self._value
            self._value = value if old is None else (1 - self.weight) * old + self.weight * value


class ServerMetrics:
    """The HTTP server's metrics, in the endpoint's registry (beside its engine's)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "Time from request to first token.", buckets=_TTFT_BUCKETS,
                              registry=registry)


class SessionMetrics:
    """Stateful sessions: how many are open, the KV they pin, and how often a session's turn
    found its conversation in the cache. In the engine's registry, beside its metrics."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.open = Gauge(f"{PREFIX}_sessions_open", "Stateful sessions open.", registry=registry)
        self.ended = Counter(f"{PREFIX}_sessions_ended", "Sessions ended, by how (closed or "
                             "expired).", ["how"], registry=registry)
        self.pinned_bytes = Gauge(f"{PREFIX}_session_pinned_bytes",
                                  "Bytes of KV that sessions pin in the CPU tier.",
                                  registry=registry)
        self.unpinned = Counter(f"{PREFIX}_session_unpins", "Sessions whose pins were released, "
                                "by why (ended, or budget: the least recently used session "
                                "made room).", ["why"], registry=registry)
        self.turns = Counter(f"{PREFIX}_session_turns", "Inference requests in a session.",
                             registry=registry)
        self.hits = Counter(f"{PREFIX}_session_hits", "Session turns whose prompt found a "
                            "cached prefix.", registry=registry)
        self.hit_tokens = Counter(f"{PREFIX}_session_hit_tokens", "Prompt tokens of session "
                                  "turns found in the cache.", registry=registry)

    def observe_turn(self, hit_tokens: int) -> None:
        """One session turn whose prompt's cached prefix was ``hit_tokens`` long."""
        self.turns.inc()
        if hit_tokens > 0:
            self.hits.inc()
            self.hit_tokens.inc(hit_tokens)
