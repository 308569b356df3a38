"""The connector's figures through vLLM's own stats path: the workers' and the scheduler's
stats, summed by vLLM, reach vLLM's "KV Transfer metrics" log line (``KVConnectorLogging``),
the Prometheus series (``build_prom_metrics``) and, when on, one CloudWatch EMF line per
interval on stdout."""

from __future__ import annotations

import functools
import json

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging

from lmcache_ext.adapters.vllm.connector import LMCacheExtConnector
from lmcache_ext.adapters.vllm.stats import LEVELS, emf_metrics
from tests.adapters.vllm.rig import make_request, step
from tests.adapters.vllm.test_connector import LAYOUTS, PROMPT_A, PROMPT_B, rig_for, save_prompt_a
from tests.test_emf import verify_emf


def summed(payloads: list[dict]) -> dict:
    total = LMCacheExtConnector.build_kv_connector_stats({})
    for payload in payloads:
        total.aggregate(LMCacheExtConnector.build_kv_connector_stats(payload))
    return total.data


def save_a_then_load_b(rig, backend: str) -> None:
    forward = save_prompt_a(rig, backend)
    forward.prompts["b"] = PROMPT_B
    rig.scheduler.add_request(make_request("b", PROMPT_B))
    step(rig, forward)


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_hits_loads_and_saves_reach_vllm_log_line_and_metrics(tmp_path, layout, backend):
    """Scenario: A is saved (96 tokens), then B (120 tokens) loads the 64 it shares."""
    rig = rig_for(tmp_path, layout, backend)
    save_a_then_load_b(rig, backend)
    data = summed(rig.stats_payloads)
    assert data["stored_tokens"] == 96 + 32  # A's 3 chunks, then B's third
    assert data["loaded_tokens"] == 64 and data["hit_tokens"] == 64
    assert data["lookup_tokens"] == (len(PROMPT_A) - 1) + (len(PROMPT_B) - 1)
    assert data["loaded_tokens.cpu"] == 64 and data["stored_tokens.cpu"] == 128
    assert data["used_bytes.cpu.r0"] > 0 and "failed_loads" not in data
    # vLLM's own logger, as its StatLogger uses it
    lines: list[str] = []
    logging = KVConnectorLogging(rig.scheduler.vllm_config.kv_transfer_config)
    for payload in rig.stats_payloads:
        logging.observe(payload)
    logging.log(log_fn=lambda fmt, *args: lines.append(fmt % args))
    rate = round(64 / ((len(PROMPT_A) - 1) + (len(PROMPT_B) - 1)), 4)
    assert len(lines) == 1 and "loaded_tokens=64" in lines[0] and f"hit_rate={rate}" in lines[0]
    # vLLM's /metrics, through the connector's build_prom_metrics
    registry = CollectorRegistry()
    types = {kind: functools.partial(kind, registry=registry)
             for kind in (Counter, Gauge, Histogram)}
    prom = LMCacheExtConnector.build_prom_metrics(rig.scheduler.vllm_config, types,
                                                  ["model_name", "engine"], {0: ["m", "0"]})
    for payload in rig.stats_payloads:
        prom.observe(payload, 0)
    labels = {"model_name": "m", "engine": "0"}
    assert registry.get_sample_value("vllm:lmcache_ext_loaded_tokens_total", labels) == 64
    assert registry.get_sample_value("vllm:lmcache_ext_tier_stored_tokens_total",
                                     {**labels, "tier": "cpu"}) == 128
    assert registry.get_sample_value("vllm:lmcache_ext_tier_used_bytes",
                                     {**labels, "tier": "cpu"}) > 0


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_pins_and_staging_in_use_are_gauges_that_return_to_zero(tmp_path, layout, backend):
    """Scenario: B's lookup pins A's chunks on the rank; a step before its load reports one
    pinned request; after the load and the saves every level is back to 0 (a level that
    stays up while idle is a leak), summed over ranks and in /metrics."""
    rig = rig_for(tmp_path, layout, backend)
    save_prompt_a(rig, backend)
    rig.scheduler.add_request(make_request("b", PROMPT_B))
    rig.scheduler.schedule()  # the lookup: pinned on the rank, the load not run yet
    worker = rig.worker.worker
    pinned = worker.take_stats().data
    assert pinned["pinned_requests.r0"] == 1
    worker.pins.release_all()
    worker.saves.jobs.close()  # every queued store done: their staging buffers returned
    idle = worker.take_stats().data
    assert idle["pinned_requests.r0"] == 0
    levels = summed([*rig.stats_payloads, pinned, idle])  # levels are sent when they change
    assert levels["pinned_requests.r0"] == 0 and levels["staging_bytes.r0"] == 0
    again = worker.take_stats()  # nothing changed: not sent again
    assert again is None or "pinned_requests.r0" not in again.data
    total = summed([{"pinned_requests.r0": 2, "staging_bytes.r0": 1},
                    {"pinned_requests.r1": 1, "pinned_requests.r0": 0}])
    assert LMCacheExtConnector.build_kv_connector_stats(total).reduce()["pinned_requests"] == 1
    assert emf_metrics(total)["PinnedRequests"] == (1.0, "Count")


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_levels_reach_metrics_as_the_latest_value_summed_over_ranks(tmp_path, layout, backend):
    """Session pins, staging buffers in use and requests holding pins (what a long run watches
    for leaks) come with every tier sample; a later value replaces an earlier one (a level,
    not a count), and /metrics sums the ranks' latest."""
    rig = rig_for(tmp_path, layout, backend)
    save_a_then_load_b(rig, backend)
    data = summed(rig.stats_payloads)
    assert {f"{level}.r0" for level in LEVELS} <= set(data)
    assert data["pinned_bytes.r0"] == 0  # no session here
    assert summed([{"pinned_requests.r0": 2, "staging_bytes.r0": 9},
                   {"pinned_requests.r0": 0, "staging_bytes.r0": 4}]) == \
        {"pinned_requests.r0": 0, "staging_bytes.r0": 4}
    registry = CollectorRegistry()
    types = {kind: functools.partial(kind, registry=registry)
             for kind in (Counter, Gauge, Histogram)}
    prom = LMCacheExtConnector.build_prom_metrics(rig.scheduler.vllm_config, types,
                                                  ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe({"pinned_requests.r0": 3, "pinned_requests.r1": 1, "pinned_bytes.r0": 11}, 0)
    labels = {"model_name": "m", "engine": "0"}
    assert registry.get_sample_value("vllm:lmcache_ext_pinned_requests", labels) == 4
    assert registry.get_sample_value("vllm:lmcache_ext_pinned_bytes", labels) == 11
    assert registry.get_sample_value("vllm:lmcache_ext_tier_used_bytes",
                                     {**labels, "tier": "pinned_bytes"}) is None


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_a_failed_load_is_counted(tmp_path, layout, backend):
    """Scenario: B's chunks vanish between the lookup and the load: a failed load, counted."""
    rig = rig_for(tmp_path, layout, backend)
    forward = save_prompt_a(rig, backend)
    forward.prompts["b"] = PROMPT_B
    rig.scheduler.add_request(make_request("b", PROMPT_B))
    output = rig.scheduler.schedule()
    assert output.kv_connector_metadata.loads
    rig.worker.worker.pins.release_all()
    for tier in rig.worker.engine.storage.tiers:
        for span in rig.worker.engine.spans(PROMPT_B):
            tier.remove(span.key)
    from tests.adapters.vllm.rig import run_worker
    errors, _, _ = run_worker(rig, output, forward)
    assert errors and rig.last_stats.data["failed_loads"] == 1


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_emf_lines_on_stdout_follow_the_specification(tmp_path, layout, backend, capsys):
    """Scenario: EMF on, an interval shorter than a step: A saved, B loads 64 tokens; every
    line on stdout is a valid EMF document and together they count what happened."""
    rig = rig_for(tmp_path, layout, backend, emf_metrics=True, emf_interval_s=0.001,
                  emf_namespace="LMCacheExtTest")
    save_a_then_load_b(rig, backend)
    rig.connector.shutdown()  # writes the last interval's line (B's lookup)
    lines = [line for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert lines
    docs = [verify_emf(line) for line in lines]
    assert {d["_aws"]["CloudWatchMetrics"][0]["Namespace"] for d in docs} == {"LMCacheExtTest"}
    assert all(d["Model"].endswith("tiny-llama") for d in docs)
    assert sum(d["LoadedTokens"] for d in docs) == 64
    assert sum(d["StoredTokens.cpu"] for d in docs if "StoredTokens.cpu" in d) == 128
    assert any(d["HitRate"] > 0 for d in docs)
    assert json.loads(lines[-1])["UsedBytes.cpu"] > 0


def test_emf_is_off_by_default_outside_sagemaker(tmp_path, monkeypatch, capsys):
    for name in [n for n in __import__("os").environ if n.startswith(("SM_", "SAGEMAKER_"))]:
        monkeypatch.delenv(name)
    rig = rig_for(tmp_path, *LAYOUTS[0], emf_interval_s=0.001)
    save_a_then_load_b(rig, LAYOUTS[0][1])
    assert '"_aws"' not in capsys.readouterr().out
