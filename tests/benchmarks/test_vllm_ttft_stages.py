"""benchmarks/vllm_ttft.py's stages, yardsticks, targets and plot styles (ttft_report,
ttft_yardsticks), without an engine: each part on real files, a real Redis server and the rows
the benchmark defines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ttft_report
import ttft_yardsticks
import vllm_ttft

from lmcache_ext.testing.redis_server import RedisServer


def test_stages_are_the_clock_differences_and_other_is_the_rest_of_the_ttft():
    before = {"lookup": 1.0, "pin": 2.0, "read": 3.0, "scatter": 4.0, "load_other": 5.0}
    after = {"lookup": 1.001, "pin": 2.002, "read": 3.05, "scatter": 4.02, "load_other": 5.003}
    stages = ttft_report.stage_seconds(before, after, 0.1)
    assert set(stages) == {"lookup_s", "pin_s", "read_s", "copy_scatter_s", "bookkeeping_s",
                           "other_s"}
    assert stages["read_s"] == pytest.approx(0.05) and stages["pin_s"] == pytest.approx(0.002)
    assert sum(stages.values()) == pytest.approx(0.1)


def test_targets_hold_each_row_to_its_yardstick():
    entries = {"prefix_cache": {"warm_s": 0.08},
               "ext_cpu_mp": {"warm_s": 0.09, "own_prefix_hit_s": 0.085},
               "ext_disk_mp": {"warm_s": 0.25, "raw_read_s": 0.1},
               "ext_redis_mp": {"warm_s": 0.5, "raw_get_s": 0.2}}
    got = ttft_report.targets(entries)
    assert got["ext_cpu_mp_vs_own_hit"]["met"] and got["ext_cpu_mp_vs_prefix_cache_engine"]["met"]
    assert got["ext_disk_mp_vs_cpu_plus_raw"] == {"value": 0.25, "limit": 0.24, "met": False}
    assert got["ext_redis_mp_vs_cpu_plus_raw"]["limit"] == pytest.approx(0.39)
    assert not got["ext_redis_mp_vs_cpu_plus_raw"]["met"]
    assert "ext_cpu_tp_vs_own_hit" not in got  # a row not run has no target
    assert "ext_cpu_mp_vs_own_plus_raw_copy" not in got  # no yardstick measured, no bound


def test_a_cpu_hit_is_bound_by_its_own_hit_plus_its_bytes_at_memcpy_speed():
    entries = {"ext_cpu_mp": {"warm_s": 0.12, "own_prefix_hit_s": 0.077, "raw_copy_s": 0.03},
               "ext_cpu_tp": {"warm_s": 0.4, "own_prefix_hit_s": 0.23, "raw_copy_s": 0.03}}
    got = ttft_report.targets(entries)
    assert got["ext_cpu_mp_vs_own_plus_raw_copy"] == {"value": 0.12, "limit": 0.122,
                                                      "met": True}
    assert not got["ext_cpu_tp_vs_own_plus_raw_copy"]["met"]
    assert not got["ext_cpu_mp_vs_own_hit"]["met"]  # the ratio is reported beside it


def test_raw_copy_times_the_hits_bytes_on_one_thread():
    import torch
    threads = torch.get_num_threads()
    got = ttft_yardsticks.raw_copy_s(hit_bytes=64 << 20, chunk_bytes=4 << 20, rounds=3)
    assert got["raw_copy_s"] > 0
    assert got["raw_copy_s"] == pytest.approx((64 << 20) / (got["raw_copy_gbps"] * 1e9),
                                              rel=0.05)
    assert torch.get_num_threads() == threads  # the caller's threads are given back


def test_raw_read_times_the_tiers_files_with_o_direct(tmp_path):
    kv = tmp_path / "kv"
    kv.mkdir()
    for i in range(3):
        (kv / f"chunk{i}").write_bytes(os.urandom(2 << 20))
    (kv / "small").write_bytes(b"x" * 100)  # not a chunk: left out
    got = ttft_yardsticks.raw_read_s(kv, hit_bytes=6 << 20)
    # The disk tier needs O_DIRECT (ext4, not tmpfs): where tmp_path lacks it, this fails
    # with the reason rather than hiding the yardstick's path.
    assert "error" not in got, got["error"]
    assert got["raw_read_files"] == 3 and got["raw_read_s"] > 0
    assert got["raw_read_s"] == pytest.approx((6 << 20) / (got["raw_read_gbps"] * 1e9), rel=0.05)
    assert "error" in ttft_yardsticks.raw_read_s(tmp_path / "missing", 1)


def test_raw_get_reads_the_rows_own_values_from_the_server(tmp_path):
    server = RedisServer(Path(tmp_path) / "redis").start()
    try:
        client = server.client()
        for i in range(3):
            client.set(f"int8:ns:{i}", os.urandom(1 << 20))
        client.set("lmcache-ext:ns:0", os.urandom(1 << 20))  # another row's
        client.set("int8:ns:small", b"x")
        got = ttft_yardsticks.raw_get_s(server.url, "int8", hit_bytes=3 << 20)
        assert got["raw_get_keys"] == 3 and got["raw_get_s"] > 0
        assert "error" in ttft_yardsticks.raw_get_s(server.url, "sealed", 1)
    finally:
        server.stop()


def test_every_row_has_its_own_colour_and_marker():
    names = [c.name for c in vllm_ttft.configs("/tmp/bench", "redis://127.0.0.1:1", "py")]
    styles = ttft_report.plot_styles(names, names, tuple(f"C{i}" for i in range(20)))
    assert len(set(styles.values())) == len(names)
    colours = [colour for colour, _ in styles.values()]
    markers = [marker for _, marker in styles.values()]
    assert len(set(colours)) == len(set(markers)) == len(names)
    assert styles["off"] != styles["lmcache_mp"]


def test_every_row_reserves_the_same_cpus_for_vllms_engine_core(monkeypatch):
    """Cold TTFT is comparable only if every engine's prefill gets the same threads."""
    monkeypatch.setattr(vllm_ttft, "default_model_dir", lambda: Path("/models/smollm2"))
    for config in vllm_ttft.configs("/tmp/bench", "redis://127.0.0.1:1", "py"):
        spec = vllm_ttft.engine_spec(config)
        assert spec.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
        assert spec.stage_probe == (config.cache is not None)


def test_rounds_give_each_figure_its_median_and_keep_what_each_round_measured():
    rounds = [{"warm_s": 0.10, "own_prefix_hit_s": 0.08, "cached_tokens": 4096, "note": "a",
               "stages": {"read_s": 0.01}, "by_context": {"4097": {"warm_s": 0.10}}},
              {"warm_s": 0.30, "own_prefix_hit_s": 0.20, "cached_tokens": 4096, "note": "b",
               "stages": {"read_s": 0.05}, "by_context": {"4097": {"warm_s": 0.30}}},
              {"error": "engine died"},
              {"warm_s": 0.12, "own_prefix_hit_s": 0.09, "cached_tokens": 4096, "note": "c",
               "stages": {"read_s": 0.02}, "by_context": {"4097": {"warm_s": 0.12}}}]
    got = ttft_report.median_of_rounds(rounds)
    assert got["warm_s"] == 0.12 and got["own_prefix_hit_s"] == 0.09  # one slow engine ignored
    assert got["stages"] == {"read_s": 0.02} and got["by_context"]["4097"]["warm_s"] == 0.12
    assert got["cached_tokens"] == 4096 and got["note"] == "a"
    assert got["rounds"] == 3 and got["warm_s_rounds"] == [0.10, 0.30, 0.12]
    assert got["failed_rounds"] == ["engine died"]
    assert ttft_report.median_of_rounds([{"error": "x"}, {"error": "y"}]) == {"error": "x"}
    one = ttft_report.median_of_rounds(rounds[:1])
    assert one["warm_s"] == 0.10 and "failed_rounds" not in one
