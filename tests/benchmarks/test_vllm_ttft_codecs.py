"""benchmarks/vllm_ttft.py's codec rows: each row is a configuration the real config accepts, no
two rows share stored chunks (the same prompts would otherwise hit another row's chunks), and
the ratios set each codec's hit against its own tier's raw hit."""

from __future__ import annotations

import ttft_report
import vllm_ttft

from lmcache_ext.config import load_config


def _rows() -> dict[str, vllm_ttft.Config]:
    return {c.name: c for c in vllm_ttft.configs("/tmp/bench", "redis://127.0.0.1:1", "py")}


def test_every_codec_row_is_a_valid_config_naming_its_codec():
    rows = _rows()
    for codec in vllm_ttft.CODECS:
        disk = load_config(env={}, overrides=rows[f"ext_disk_{codec}_mp"].cache)
        redis = load_config(env={}, overrides=rows[f"ext_redis_{codec}_mp"].cache)
        assert disk.local_disk_codec == codec and redis.remote_codec == codec
    sealed = rows["ext_redis_sealed_mp"]  # the engine sees the row's env too
    config = load_config(env=sealed.env, overrides=sealed.cache)
    assert sealed.env[config.remote_encryption_key_env]


def test_no_two_rows_share_a_disk_directory_or_a_key_prefix():
    rows = [c.cache for c in _rows().values() if c.cache]
    disks = [r["local_disk"] for r in rows if r.get("local_disk")]
    prefixes = [r.get("remote_key_prefix", "lmcache-ext") for r in rows if r.get("remote_url")]
    assert len(disks) == len(set(disks)) == 3
    assert len(prefixes) == len(set(prefixes)) == 4


def test_ratios_put_each_codec_row_over_its_raw_tier():
    entries = {"ext_redis_mp": {"warm_s": 0.6}, "ext_redis_int4_mp": {"warm_s": 0.3},
               "ext_disk_mp": {"warm_s": 0.4}, "ext_disk_int8_mp": {"warm_s": 0.5}}
    ratios = ttft_report.ratios(entries)
    assert ratios["ext_redis_int4_mp_warm_vs_raw_redis_warm"] == 0.5
    assert ratios["ext_disk_int8_mp_warm_vs_raw_disk_warm"] == 1.25
    assert not any("int8_mp_warm_vs_raw_redis" in key for key in ratios)
