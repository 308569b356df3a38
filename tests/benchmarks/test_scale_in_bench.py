"""benchmarks/scale_in.py --quick: real processes (redis-server, 3 replicas, the router), the tiny
model; the JSON has the figures the issue names, and the drain hands every drained history
over while a replica without a shared tier recomputes it all."""

from __future__ import annotations

import importlib


def _bench():
    return importlib.import_module("scale_in")  # benchmarks/ is on the path (conftest.py)


def test_quick_mode_gives_every_figure_and_the_drain_loses_no_history(tmp_path):
    bench = _bench()
    report = bench.run("quick")
    runs = report["runs"]
    assert set(runs) == {"drain", "crash", "no_shared_tier"}
    for name, figures in runs.items():
        assert {"failed_turns", "next_turn_after_drain_s", "warm_turn_s",
                "history_tokens_recomputed"} <= set(figures), name
        assert figures["failed_turns"] == 0, (name, figures["failures"])
        assert figures["recreated_turns"] >= 1 and figures["history_tokens"] > 0, name
    assert runs["drain"]["exit_code"] == 0
    assert runs["drain"]["history_tokens_recomputed"] == 0
    assert runs["no_shared_tier"]["history_tokens_recomputed"] == \
        runs["no_shared_tier"]["history_tokens"]
    assert bench.table(report).splitlines()[0].startswith("run")
    bench.plot(report, str(tmp_path / "scale_in.png"))
    assert (tmp_path / "scale_in.png").stat().st_size > 0
