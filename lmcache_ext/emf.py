"""CloudWatch Embedded Metric Format (EMF): log lines that CloudWatch Logs turns into metrics.

On a SageMaker endpoint nobody scrapes ``/metrics``, but the container's stdout goes to
CloudWatch Logs, and a line that is an EMF document becomes CloudWatch metrics with no agent.
One document (the specification, "Embedded metric format document structure"):

  {"_aws": {"Timestamp": <ms since the epoch>,
            "CloudWatchMetrics": [{"Namespace": "LMCacheExt",
                                   "Dimensions": [["Model"]],
                                   "Metrics": [{"Name": "HitRate", "Unit": "Percent"}, ...]}]},
   "Model": "<model>", "HitRate": 42.0, ...}

Rules kept here (the spec's MUSTs and CloudWatch's limits): the line is one JSON object and
nothing else; every dimension and metric named in a directive is a root member; dimension values
are strings, metric values numbers; at most 30 dimensions in a set and 100 metrics in a
directive; names 1-255 characters; units from CloudWatch's list.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping

MAX_METRICS = 100
MAX_DIMENSIONS = 30
MAX_NAME = 255
UNITS = frozenset({
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes",
    "Terabytes", "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count",
    "Bytes/Second", "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second",
    "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second", "Gigabits/Second",
    "Terabits/Second", "Count/Second", "None"})
SAGEMAKER_ENV_PREFIXES = ("SM_", "SAGEMAKER_")


def on_sagemaker(env: Mapping[str, str]) -> bool:
    """True where the environment says this is a SageMaker container."""
    return any(name.startswith(SAGEMAKER_ENV_PREFIXES) for name in env)


def emf_document(namespace: str, dimensions: Mapping[str, str],
                 metrics: Mapping[str, tuple[float, str]], timestamp_ms: int) -> dict:
    """One EMF document; ``metrics`` maps a name to (value, unit). Raises ValueError for
    anything CloudWatch would reject (so a bad line fails in tests, not silently in prod)."""
    _check_name("namespace", namespace)
    if namespace.startswith(":"):
        raise ValueError(f"an EMF namespace cannot start with ':': {namespace!r}")
    if not 0 < len(metrics) <= MAX_METRICS:
        raise ValueError(f"an EMF directive holds 1-{MAX_METRICS} metrics, got {len(metrics)}")
    if len(dimensions) > MAX_DIMENSIONS:
        raise ValueError(f"at most {MAX_DIMENSIONS} dimensions, got {len(dimensions)}")
    for name, value in dimensions.items():
        _check_name("dimension", name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"dimension {name!r} needs a non-empty string value")
    for name, (value, unit) in metrics.items():
        _check_name("metric", name)
        if name in dimensions or name == "_aws":
            raise ValueError(f"metric {name!r} clashes with another member")
        if unit not in UNITS:
            raise ValueError(f"metric {name!r}: {unit!r} is not a CloudWatch unit")
        if isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"metric {name!r}: {value!r} is not a finite number")
    directive = {"Namespace": namespace, "Dimensions": [list(dimensions)],
                 "Metrics": [{"Name": name, "Unit": unit} for name, (_, unit) in metrics.items()]}
    return {"_aws": {"Timestamp": int(timestamp_ms), "CloudWatchMetrics": [directive]},
            **dimensions, **{name: value for name, (value, _) in metrics.items()}}


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isascii() or \
            not name.strip():
        raise ValueError(f"an EMF {kind} name must be 1-{MAX_NAME} ASCII characters: {name!r}")


class EmfReporter:
    """Sums figures and writes one EMF line per ``interval_s`` (on the caller's thread, from
    ``add``; no line for an interval without figures). Not thread-safe: one caller."""

    def __init__(self, namespace: str, dimensions: Mapping[str, str], interval_s: float,
                 summarize: Callable[[dict[str, float]], dict[str, tuple[float, str]]],
                 merge: Callable[[dict, Mapping], None] | None = None,
                 gauge_prefix: str | tuple[str, ...] | None = None,
                 write: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time):
        """``summarize`` turns an interval's figures into metrics {name: (value, unit)};
        ``merge`` folds a step's figures into the interval's (default: sums); figures named
        ``gauge_prefix``... are levels, carried into the next interval until updated."""
        self.namespace = namespace
        self.dimensions = dict(dimensions)
        self.interval_s = interval_s
        self._summarize = summarize
        self._write = write or _stdout_line
        self._clock = clock
        self._merge = merge or _sum_into
        self._gauge_prefix = gauge_prefix
        self._pending: dict[str, float] = {}
        self._since = clock()

    def add(self, data: Mapping[str, float]) -> str | None:
        """Take a step's figures; the line written if the interval is over, else None."""
        self._merge(self._pending, data)
        if self._clock() - self._since < self.interval_s:
            return None
        return self.flush()

    def flush(self) -> str | None:
        """Write the figures gathered so far now (at shutdown: the last, short interval)."""
        now = self._clock()
        if not self._pending:
            return None
        metrics = self._summarize(self._pending)
        prefix = self._gauge_prefix
        self._since = now
        self._pending = {} if prefix is None else \
            {k: v for k, v in self._pending.items() if k.startswith(prefix)}
        if not metrics:
            return None
        line = json.dumps(emf_document(self.namespace, self.dimensions, metrics,
                                       int(now * 1000)), separators=(",", ":"))
        self._write(line)
        return line


def _sum_into(total: dict, data: Mapping) -> None:
    for name, value in data.items():
        total[name] = total.get(name, 0) + value


def _stdout_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
