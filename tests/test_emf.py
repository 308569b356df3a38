"""CloudWatch Embedded Metric Format lines, checked against the specification's rules
(docs.aws.amazon.com, "Specification: Embedded metric format"), not against our own writer."""

from __future__ import annotations

import json
import math

import pytest

from lmcache_ext.emf import UNITS, EmfReporter, emf_document, on_sagemaker


def verify_emf(line: str) -> dict:
    """The spec's MUSTs for one log event; returns the parsed document."""
    assert "\n" not in line and line == line.strip()  # one JSON object, nothing around it
    doc = json.loads(line)
    assert isinstance(doc, dict)
    aws = doc["_aws"]
    assert set(aws) <= {"Timestamp", "CloudWatchMetrics"}  # no members the spec does not define
    assert isinstance(aws["Timestamp"], int) and aws["Timestamp"] > 1_500_000_000_000  # ms
    directives = aws["CloudWatchMetrics"]
    assert isinstance(directives, list) and directives
    for directive in directives:
        assert set(directive) == {"Namespace", "Dimensions", "Metrics"}
        namespace = directive["Namespace"]
        assert isinstance(namespace, str) and 1 <= len(namespace) <= 255
        for dimension_set in directive["Dimensions"]:
            assert isinstance(dimension_set, list) and len(dimension_set) <= 30
            for name in dimension_set:  # a reference to a root member with a string value
                assert isinstance(doc[name], str) and doc[name]
        metrics = directive["Metrics"]
        assert 1 <= len(metrics) <= 100
        names = [m["Name"] for m in metrics]
        assert len(set(names)) == len(names)
        for metric in metrics:
            assert set(metric) <= {"Name", "Unit", "StorageResolution"}
            assert isinstance(metric["Name"], str) and 1 <= len(metric["Name"]) <= 255
            assert metric.get("Unit", "None") in UNITS
            value = doc[metric["Name"]]  # a reference to a root member with a number value
            assert isinstance(value, int | float) and not isinstance(value, bool)
            assert math.isfinite(value)
    return doc


def test_a_document_follows_the_specification():
    doc = emf_document("LMCacheExt", {"Model": "qwen"},
                       {"HitRate": (42.5, "Percent"), "UsedBytes.cpu": (1 << 30, "Bytes")},
                       1_764_600_000_000)
    parsed = verify_emf(json.dumps(doc, separators=(",", ":")))
    assert parsed["HitRate"] == 42.5 and parsed["Model"] == "qwen"
    assert parsed["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Model"]]


@pytest.mark.parametrize(("namespace", "dimensions", "metrics"), [
    ("", {"Model": "m"}, {"A": (1, "Count")}),  # empty namespace
    (":x", {"Model": "m"}, {"A": (1, "Count")}),  # namespace starting with ':'
    ("N", {"Model": ""}, {"A": (1, "Count")}),  # empty dimension value
    ("N", {"Model": "m"}, {}),  # no metric
    ("N", {"Model": "m"}, {f"M{i}": (1, "Count") for i in range(101)}),  # over 100
    ("N", {"Model": "m"}, {"A": (1, "Tokens")}),  # not a CloudWatch unit
    ("N", {"Model": "m"}, {"A": (float("nan"), "Count")}),  # not a finite number
    ("N", {"Model": "m"}, {"Model": (1, "Count")}),  # a metric named like a dimension
    ("N", {f"D{i}": "v" for i in range(31)}, {"A": (1, "Count")}),  # over 30 dimensions
])
def test_what_cloudwatch_would_reject_is_an_error_here(namespace, dimensions, metrics):
    with pytest.raises(ValueError):
        emf_document(namespace, dimensions, metrics, 1_764_600_000_000)


def test_sagemaker_is_recognised_by_its_env():
    assert on_sagemaker({"SM_CURRENT_HOST": "algo-1"})
    assert on_sagemaker({"SAGEMAKER_BIND_TO_PORT": "8080"})
    assert not on_sagemaker({"HOME": "/root", "OPTION_MODEL_ID": "x"})


def test_one_line_per_interval_with_the_interval_sums():
    """Scenario: steps at 10, 30, 61 and 62 s with a 60 s interval: one line at 61 s that
    sums the first three steps; the fourth waits for the next interval."""
    start = 1_764_600_000.0  # 2025-12-01, in seconds
    now = [start]
    lines: list[str] = []
    reporter = EmfReporter("LMCacheExt", {"Model": "m"}, 60.0,
                           lambda d: {"Hits": (d["hits"], "Count")}, write=lines.append,
                           clock=lambda: now[0])
    for t in (10, 30, 61, 62):
        now[0] = start + t
        reporter.add({"hits": 1})
    assert len(lines) == 1
    doc = verify_emf(lines[0])
    assert doc["Hits"] == 3 and doc["_aws"]["Timestamp"] == int((start + 61) * 1000)


def test_a_level_is_carried_into_the_next_interval():
    """Scenario: bytes used is reported once; the next interval's line still says it."""
    now = [1_764_600_000.0]
    lines: list[str] = []
    reporter = EmfReporter("LMCacheExt", {"Model": "m"}, 60.0,
                           lambda d: {"Used": (d.get("used.cpu", 0), "Bytes"),
                                      "Hits": (d.get("hits", 0), "Count")},
                           gauge_prefix="used.", write=lines.append, clock=lambda: now[0])
    reporter.add({"used.cpu": 5, "hits": 1})
    now[0] += 61
    reporter.add({"hits": 2})
    now[0] += 61
    reporter.add({})
    assert [(verify_emf(x)["Used"], verify_emf(x)["Hits"]) for x in lines] == [(5, 3), (5, 0)]
