"""The sizing advisor against the seed's "when to use LMCache" table for ml.p4de.24xlarge."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmcache_ext.sizing.advisor import (
    KNOWN_MODELS,
    advise,
    model_from_config,
    plan_capacity,
    read_model_config,
    suggest_prefix_length,
)
from lmcache_ext.sizing.instances import INSTANCES, get_instance
from lmcache_ext.units import GIB
from tests.helpers import LLAMA_LIKE

P4DE = get_instance("ml.p4de.24xlarge")

# The seed's rows: (model we take for the row, "no offloading" below, "CPU offloading" up to).
SEED_ROWS = [
    ("llama-3.2-1b", 2_000_000, 30_000_000),  # ~1B:    < 2M none, 2M-30M CPU, > 25M disk
    ("llama-3-8b", 250_000, 8_000_000),       # ~7-10B: < 250K none, 250K-8M CPU, > 6M disk
    ("qwen3-8b", 250_000, 8_000_000),
    ("llama-3-70b", 250_000, 3_000_000),      # ~70B+:  < 250K none, 250K-3M CPU, > 2.5M disk
    ("qwen2.5-72b", 250_000, 3_000_000),
]


def verify_within_factor_2(ours: float, seed: float, what: str) -> None:
    assert seed / 2 <= ours <= seed * 2, f"{what}: ours {ours:,.0f} vs the seed's {seed:,.0f}"


@pytest.mark.parametrize("name, none_below, cpu_up_to", SEED_ROWS)
def test_boundaries_match_the_seeds_p4de_table_within_a_factor_of_2(name, none_below, cpu_up_to):
    capacity = plan_capacity(KNOWN_MODELS[name], P4DE)
    verify_within_factor_2(capacity.gpu_tokens, none_below, f"{name} no-offload boundary")
    verify_within_factor_2(capacity.cpu_tokens, cpu_up_to, f"{name} CPU-to-disk boundary")


@pytest.mark.parametrize("name, none_below, cpu_up_to", SEED_ROWS)
def test_recommendations_inside_each_of_the_seeds_ranges(name, none_below, cpu_up_to):
    capacity = plan_capacity(KNOWN_MODELS[name], P4DE)
    assert advise(capacity, none_below // 2).tier == "none"
    middle = advise(capacity, int((none_below * cpu_up_to) ** 0.5) * 2)
    assert middle.tier == "cpu" and middle.max_local_cpu_size > 0
    far = advise(capacity, cpu_up_to * 3)
    assert far.tier == "disk" and far.max_local_disk_size > 0


def test_the_seeds_key_insight_72b_offloads_near_500k_and_1_5b_beyond_2_5m():
    verify_within_factor_2(plan_capacity(KNOWN_MODELS["qwen2.5-72b"], P4DE).gpu_tokens,
                           500_000, "qwen2.5-72b")
    verify_within_factor_2(plan_capacity(KNOWN_MODELS["qwen2.5-1.5b"], P4DE).gpu_tokens,
                           2_500_000, "qwen2.5-1.5b")


def test_llama_3_8b_and_qwen_2_5_7b_differ_because_of_their_kv_heads():
    """Scenario: the seed's note. Same size class, 8 vs 4 KV heads (and 32 vs 28 layers)."""
    llama, qwen = KNOWN_MODELS["llama-3-8b"], KNOWN_MODELS["qwen2.5-7b"]
    assert (llama.kv_heads, qwen.kv_heads) == (8, 4)
    assert (llama.kv_bytes_per_token, qwen.kv_bytes_per_token) == (131072, 57344)
    llama_cap, qwen_cap = plan_capacity(llama, P4DE), plan_capacity(qwen, P4DE)
    assert qwen_cap.gpu_tokens > 2 * llama_cap.gpu_tokens
    assert advise(llama_cap, 700_000).tier == "cpu"
    assert advise(qwen_cap, 700_000).tier == "none"


def test_a_70b_model_gets_four_gpus_and_all_eight_on_request():
    assert plan_capacity(KNOWN_MODELS["llama-3-70b"], P4DE).tp == 4
    assert plan_capacity(KNOWN_MODELS["llama-3-8b"], P4DE).tp == 1
    assert plan_capacity(KNOWN_MODELS["llama-3-70b"], P4DE, tp=8).gpu_tokens > 1_200_000


def test_a_config_json_gives_the_same_shape_as_the_known_model(tmp_path):
    shape = model_from_config(LLAMA_LIKE)
    known = KNOWN_MODELS["llama-3-8b"]
    assert shape.kv_bytes_per_token == known.kv_bytes_per_token
    assert shape.params_b == pytest.approx(known.params_b, rel=0.01)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_LIKE, "torch_dtype": "float32"}))
    assert read_model_config(tmp_path).kv_bytes_per_token == 2 * known.kv_bytes_per_token


def test_sizes_are_per_tensor_parallel_worker():
    capacity = plan_capacity(KNOWN_MODELS["llama-3-70b"], P4DE)
    advice = advise(capacity, 1_000_000)
    need_gib = 1_000_000 * 327680 * 1.1 / GIB
    assert advice.tier == "cpu"
    assert advice.max_local_cpu_size == pytest.approx(need_gib / 4, abs=0.1)


def test_the_instance_table_is_consistent():
    for name, row in INSTANCES.items():
        assert name.startswith("ml.") and row.gpus >= 1 and row.gpu_mem_gib >= 16
        assert row.ram_gib >= row.gpus * 16


def advise_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmcache_ext.cli", "advise", *args],
                          capture_output=True, text=True, timeout=60)


def test_the_advise_command_prints_the_reasoning_in_numbers():
    done = advise_cli("--model", "llama-3-8b", "--instance", "ml.p4de.24xlarge",
                      "--context", "1000000")
    assert done.returncode == 0, done.stderr
    assert "32 layers x 8 KV heads x 128 head dim x 2 B = 131072 B" in done.stdout
    assert "for 1M tokens: cpu" in done.stdout
    assert "OPTION_LMCACHE_MAX_LOCAL_CPU_SIZE=" in done.stdout


def test_the_advise_command_with_a_config_and_a_custom_machine_as_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_LIKE))
    done = advise_cli("--model-config", str(tmp_path / "config.json"), "--gpus", "1",
                      "--gpu-mem", "24", "--ram", "64", "--nvme", "400", "--context",
                      "1000000", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["kv_bytes_per_token"] == 131072 and out["advice"]["tier"] == "disk"


@pytest.mark.parametrize("args, text", [
    (("--model", "gpt-9", "--instance", "ml.p4de.24xlarge"), "unknown model 'gpt-9'"),
    (("--model", "llama-3-8b", "--instance", "ml.x1.large"), "unknown instance"),
    (("--model", "llama-3-8b", "--gpus", "1"), "--gpu-mem"),
])
def test_the_advise_command_refuses_bad_arguments(args, text):
    done = advise_cli(*args)
    assert done.returncode == 2 and text in done.stderr, done.stderr


def test_prefix_length_covers_the_shared_prefix_and_one_chunk():
    """The rule: envelope + (shared + one chunk) tokens x bytes per token, in SageMaker's
    range."""
    advice = suggest_prefix_length(256, 1000, group_prefix_tokens=4000)
    assert advice.prefix_length == 64 + (1000 + 256) * 4 and advice.key_tokens == 1256
    assert "WARNING" not in advice.reason
    assert suggest_prefix_length(16, 40).prefix_length == 1024  # SageMaker's shortest
    longest = suggest_prefix_length(256, 20000)
    assert longest.prefix_length == 65536 and "every request has the same key" in longest.reason


def test_prefix_length_past_the_groups_text_is_said():
    """Scenario: documents shorter than a chunk: the key reaches each request's question, and
    prefix-aware routing scatters a document's requests as RANDOM does."""
    advice = suggest_prefix_length(256, 100, group_prefix_tokens=50)
    assert "a group scatters as with RANDOM" in advice.reason
    with pytest.raises(ValueError):
        suggest_prefix_length(0, 100)


def test_the_advise_command_suggests_a_prefix_length():
    done = advise_cli("--model", "llama-3-8b", "--instance", "ml.p4de.24xlarge",
                      "--shared-prefix-tokens", "1000", "--group-prefix-tokens", "4000")
    assert done.returncode == 0, done.stderr
    assert "SageMaker PREFIX_AWARE routing: --prefix-length 5088 (bytes" in done.stdout
    done = advise_cli("--model", "llama-3-8b", "--instance", "ml.p4de.24xlarge",
                      "--shared-prefix-tokens", "100", "--chunk-size", "64", "--json")
    assert json.loads(done.stdout)["prefix_aware"]["prefix_length"] == 1024
    done = advise_cli("--model", "llama-3-8b", "--instance", "ml.p4de.24xlarge",
                      "--group-prefix-tokens", "10")
    assert done.returncode == 2 and "only with --shared-prefix-tokens" in done.stderr
