"""benchmarks/codecs.py at its smallest setting: the real model (SmolLM2 in the built-in engine),
a real redis-server; the JSON has the figures the issue names, each a plausible number."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).parents[2] / "benchmarks" / "codecs.py"


def _bench():
    spec = importlib.util.spec_from_file_location("codecs_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_smallest_setting_gives_every_figure_for_each_codec():
    result = _bench().run("smoke")
    assert set(result["codecs"]) == {"int8", "int4"}
    for name, figures in result["codecs"].items():
        assert {"ppl_delta", "greedy_agreement", "bytes_ratio", "encode_gbps",
                "decode_gbps"} <= set(figures), name
        assert -0.5 < figures["ppl_delta"] < 0.5 and 0 <= figures["greedy_agreement"] <= 1
        assert 0 <= figures["token_agreement"] <= 1 and figures["kl_per_token"] >= 0
        assert figures["encode_gbps"] > 0 and figures["decode_gbps"] > 0
    # a coarser codec moves the model's next-token distribution further than a finer one
    assert result["codecs"]["int4"]["kl_per_token"] > result["codecs"]["int8"]["kl_per_token"]
    assert result["codecs"]["int8"]["kl_per_token"] > 0
    assert result["codecs"]["int8"]["bytes_ratio"] > 1.7
    assert result["codecs"]["int4"]["bytes_ratio"] > 2.8
    assert result["encrypted_get_vs_raw"] > 0
    assert set(result["legacy_speed"]) == {"int8-v1", "int4-v1"}
    assert all(f["decode_gbps_float32"] > 0 for f in result["legacy_speed"].values())
