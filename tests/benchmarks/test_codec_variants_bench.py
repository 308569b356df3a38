"""benchmarks/codec_variants.py: its float quantizer keeps the codecs' error bound, the rotary
round trip is exact, and its comparison, on the real model, scores raw KV as identical and a
coarser quantization as further from raw than a finer one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[2] / "benchmarks" / "codec_variants.py"


@pytest.fixture(scope="module")
def variants():
    spec = importlib.util.spec_from_file_location("codec_variants", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("per, group", [("channel", 32), ("token", 32)])
def test_each_value_is_within_half_a_step_of_its_group(variants, per, group):
    torch.manual_seed(0)
    x = torch.randn(2, 70, 3, 64)  # 70 tokens: the keys' last group is padded
    out = variants.quantize(x, 4, per, group, outliers=0.0)
    assert out.shape == x.shape
    if per == "channel":
        padded = torch.cat([x, x[:, -1:].expand(2, 26, 3, 64)], dim=1).reshape(2, 3, 32, 3, 64)
        spread = (padded.amax(2) - padded.amin(2)).repeat_interleave(32, dim=1)[:, :70]
    else:
        grouped = x.reshape(2, 70, 3, 2, 32)
        spread = (grouped.amax(4) - grouped.amin(4)).repeat_interleave(32, dim=3)
    assert ((out - x).abs() <= spread / 15 / 2 * 1.01 + 1e-3).all()
    assert (out - x).abs().max() > 0  # lossy: 4 bits cannot hold random floats


def test_exact_outliers_come_back_exactly(variants):
    x = torch.randn(1, 32, 1, 64)
    x[0, 5, 0, 7] = 1000.0
    out = variants.quantize(x, 4, "channel", 32, outliers=0.01)
    assert out[0, 5, 0, 7] == 1000.0
    assert (out - x).abs().max() < 1.0  # the outlier did not widen its channel's step


def test_raw_kv_scores_identical_and_int4_moves_the_model_more_than_int8(variants):
    from lmcache_ext.serving.model import load_model
    bench = variants._codecs_bench()
    loaded = load_model()
    ids = bench.corpus_ids(loaded.tokenizer, 0)
    prompts = [ids[:300], ids[1000:1300]]
    named = {"raw": (32.0, lambda kv: kv),
             "rope round trip": (32.0, variants.chunk_by_chunk(
                 variants.pre_rope(loaded.model, lambda kv, start: kv.clone()))),
             "int8": (9.1, variants.chunk_by_chunk(variants.shipped("int8"))),
             "int4": (5.6, variants.chunk_by_chunk(variants.shipped("int4")))}
    report = variants.compare(bench, loaded.model, prompts, named, new_tokens=8)
    assert report["raw"]["token_agreement"] == 1.0 and report["raw"]["greedy_agreement"] == 1.0
    assert abs(report["raw"]["kl_per_token"]) < 1e-6
    assert report["rope round trip"]["kl_per_token"] < 1e-4
    assert report["int4"]["kl_per_token"] > report["int8"]["kl_per_token"] > 0
