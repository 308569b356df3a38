"""benchmarks/bookkeeping.py at smoke size: every stage of a 4K-token hit is timed in process
and against a worker process, the hit is the whole prompt but its last token, and the report
says whether the bookkeeping met its target."""

from __future__ import annotations

import json

import bookkeeping


def test_a_smoke_run_times_every_stage_of_a_whole_hit_on_both_channels(tmp_path, capsys):
    out = tmp_path / "bookkeeping.json"
    assert bookkeeping.main(["--requests", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["channels"]) == {"ipc", "in_process"}
    stages = bookkeeping.SCHEDULER_STAGES + bookkeeping.WORKER_STAGES
    for result in report["channels"].values():
        assert result["hit_tokens"] == bookkeeping.PROMPT - 1  # 16 chunks of 256
        assert set(result["stages_us"]) == set(stages + bookkeeping.BYTES_STAGES)
        assert all(result["stages_us"][s] > 0 for s in stages)
        assert result["bookkeeping_us"] == round(sum(result["stages_us"][s]
                                                     for s in stages), 1)
        assert result["met"] == (result["bookkeeping_us"] <= bookkeeping.TARGET_US)
    assert report["channels"]["ipc"]["ipc_stages"] == ["finish", "hash", "lookup_pin"]
    assert "bookkeeping total" in capsys.readouterr().out
