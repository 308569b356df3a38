"""The GPU check (``scripts/gpu_check.sh``): one run on a machine with one GPU that proves the GPU
paths and measures them against issue 22's targets. Needs torch, triton and transformers; never
vLLM, never the network, no model weights (the model is random, built from a config).

1. ``tests``: the ``cuda``-marked tests (compiled Triton kernels bit-exact on vLLM 0.23/0.33
   layouts in bf16 and fp8, streams and events, the pinned slab), in a child pytest.
2. ``data_path``: per chunk (256 tokens) of 7B and 70B at TP 1 and 8, on vLLM 0.23's per-layer
   and 0.33's packed caches: gather/scatter beside a device-to-device copy of the same bytes,
   and a load (pinned host -> device, then scatter) / store (gather, then device -> pinned host)
   beside a plain pinned memcpy of the same bytes. Medians of CUDA-event timings.
3. ``engine``: the built-in engine (``serving.generator``) on the GPU with a random-weight model
   of Qwen2.5-7B's shape in bf16, prompts of 8K and 32K tokens: cold TTFT (prefill), warm TTFT
   (loaded from the CPU tier; the first warm run also allocates its pinned buffer, the repeat
   is the steady state), and the warm output equal to the cold one token for token.

``--dry-run`` runs the same logic on the CPU in a few minutes (tiny shapes, the Triton kernel in
its interpreter, a tiny random model, the cuda tests only collected): what CI runs. Writes one
JSON (``--out``, default ``$OUT/gpu_check.json``) and prints a table of the targets.

    python benchmarks/gpu_check.py [--dry-run] [--out PATH] [--skip tests,data_path,engine]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHUNK_TOKENS = 256
BLOCK_SIZE = 16
SECTIONS = ("tests", "data_path", "engine")
# (name, ratio key, at least / at most, bound): issue 22's targets.
TARGETS = (("H2D load >= 0.8 x pinned memcpy", "load_vs_h2d", ">=", 0.8),
           ("gather >= 0.7 x device copy", "gather_vs_d2d", ">=", 0.7),
           ("scatter >= 0.7 x device copy", "scatter_vs_d2d", ">=", 0.7),
           ("warm TTFT at 32K <= 1/10 cold", "warm_over_cold_32k", "<=", 0.1))


@dataclass(frozen=True)
class Plan:
    """What one run does: the GPU's shapes, or the dry run's tiny ones."""

    dry_run: bool
    device: str
    shapes: dict[str, tuple[int, int, int]]  # name -> (layers, kv heads per rank, head_dim)
    chunk_tokens: int
    reps: int
    prompts: tuple[int, ...]  # engine prompt lengths
    new_tokens: int

    @staticmethod
    def make(dry_run: bool) -> Plan:
        if dry_run:
            return Plan(True, "cpu", {"tiny-tp1": (2, 2, 16), "tiny-tp2": (2, 1, 16)}, 32, 2,
                        (512, 1024), 4)
        # Qwen2.5-7B: 28 layers, 4 KV heads; Llama-3-70B / Qwen2.5-72B: 80 layers, 8 KV heads;
        # head_dim 128. At TP 8 each rank holds max(1, heads / 8) (vLLM replicates below one).
        return Plan(False, "cuda", {"7b-tp1": (28, 4, 128), "7b-tp8": (28, 1, 128),
                                    "70b-tp1": (80, 8, 128), "70b-tp8": (80, 1, 128)},
                    CHUNK_TOKENS, 20, (8192, 32768), 8)


# ---------------------------------------------------------------------------------- tests

def cuda_test_files() -> list[str]:
    """Test modules that hold ``cuda``-marked tests (only those are collected: the others may
    import vLLM or Redis, absent on the GPU machine)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                  if "mark.cuda" in p.read_text())


# pytest as the GPU machine runs it: vLLM is not installed there, so here it cannot be imported
# either (a cuda test file that needs vLLM fails its collection in the dry run, not on the GPU).
WITHOUT_VLLM = """
import importlib.abc, sys
class NoVllm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)")
sys.meta_path.insert(0, NoVllm())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def run_tests(plan: Plan) -> dict:
    """The cuda tests (dry run: collected only, plus the kernels' interpreter tests)."""
    files = cuda_test_files()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    runs = []
    if plan.dry_run:
        runs.append(["-m", "cuda", "--collect-only", *files])
        runs.append(["tests/kernels/test_paged_kernels.py"])
    else:
        env["TRITON_INTERPRET"] = "0"  # the compiled kernels (tests/kernels sets 1 by default)
        runs.append(["-m", "cuda", *files])
    results = []
    for args in runs:
        command = [sys.executable, "-c", WITHOUT_VLLM, "-q", "-p", "no:cacheprovider", *args]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        tail = done.stdout.strip().splitlines()[-1:] or [done.stderr.strip()[-300:]]
        results.append({"command": " ".join(["pytest", *args]), "rc": done.returncode,
                        "summary": tail[0], "passed": done.returncode == 0})
        if done.returncode != 0:
            print(done.stdout[-4000:], done.stderr[-2000:], sep="\n", file=sys.stderr)
    return {"files": files, "runs": results, "passed": all(r["passed"] for r in results)}


# ------------------------------------------------------------------------------ data path

def _timer(device: str) -> Callable[[Callable[[], object], int], float]:
    """Median seconds of ``fn`` over ``reps`` calls after one warm-up: CUDA events on a GPU."""
    def cuda_time(fn: Callable[[], object], reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def cpu_time(fn: Callable[[], object], reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    return cuda_time if device == "cuda" else cpu_time


def _caches(vllm: str, shape: tuple[int, int, int], blocks: int, device: str) -> tuple[
        list[torch.Tensor], object]:
    """Per-layer caches as vLLM allocates them: 0.23 one [B, 2, N, H, D] tensor per layer
    (block_first); 0.33 per-layer [B, H, N, 2D] views of one LBNHC buffer (packed)."""
    from lmcache_ext.kernels import PagedLayout
    layers, heads, dim = shape
    if vllm == "0.23":
        return ([torch.randn(blocks, 2, BLOCK_SIZE, heads, dim, device=device).to(torch.bfloat16)
                 for _ in range(layers)], PagedLayout.BLOCK_FIRST)
    flat = torch.randn(layers, blocks, BLOCK_SIZE, heads, 2 * dim, device=device).to(
        torch.bfloat16)
    return [flat[layer].permute(0, 2, 1, 3) for layer in range(layers)], PagedLayout.PACKED


def bench_chunk(plan: Plan, name: str, shape: tuple[int, int, int], vllm: str) -> dict:
    """One chunk shape on one vLLM layout: GB/s of each copy and the target ratios."""
    from lmcache_ext.kernels import paged_kv_layers, triton_paged
    layers, heads, dim = shape
    tokens, blocks = plan.chunk_tokens, 4 * plan.chunk_tokens // BLOCK_SIZE
    caches, layout = _caches(vllm, shape, blocks, plan.device)
    views = paged_kv_layers(caches, layout, heads, dim)
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(tokens)
    host_slots = order[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    slots = host_slots.to(plan.device)
    chunk = torch.empty((layers, 2, tokens, heads, dim), dtype=torch.bfloat16, device=plan.device)
    other = torch.empty_like(chunk)
    cuda = plan.device == "cuda"
    host = torch.empty(chunk.shape, dtype=chunk.dtype, pin_memory=cuda)
    triton_paged.prepare(views)
    timer, nbytes = _timer(plan.device), chunk.numel() * chunk.element_size()

    def load() -> None:
        chunk.copy_(host, non_blocking=cuda)
        triton_paged.scatter(chunk, views, slots, host_slots)

    def store() -> None:
        triton_paged.gather(views, slots, chunk, host_slots)
        host.copy_(chunk, non_blocking=cuda)

    seconds = {
        "d2d": timer(lambda: other.copy_(chunk), plan.reps),
        "gather": timer(lambda: triton_paged.gather(views, slots, chunk, host_slots), plan.reps),
        "scatter": timer(lambda: triton_paged.scatter(chunk, views, slots, host_slots),
                         plan.reps),
        "h2d": timer(lambda: chunk.copy_(host, non_blocking=cuda), plan.reps),
        "d2h": timer(lambda: host.copy_(chunk, non_blocking=cuda), plan.reps),
        "load": timer(load, plan.reps),
        "store": timer(store, plan.reps),
    }
    gbps = {key: round(nbytes / value / 1e9, 3) for key, value in seconds.items()}
    return {"shape": name, "vllm_layout": vllm, "chunk_mib": round(nbytes / 2 ** 20, 2),
            "gbps": gbps, "seconds": seconds,
            # Same bytes each: a speed ratio is the inverse time ratio.
            "gather_vs_d2d": round(seconds["d2d"] / seconds["gather"], 4),
            "scatter_vs_d2d": round(seconds["d2d"] / seconds["scatter"], 4),
            "load_vs_h2d": round(seconds["h2d"] / seconds["load"], 4),
            "store_vs_d2h": round(seconds["d2h"] / seconds["store"], 4)}


def bench_data_path(plan: Plan) -> list[dict]:
    rows = []
    for name, shape in plan.shapes.items():
        for vllm in ("0.23", "0.33"):
            rows.append(bench_chunk(plan, name, shape, vllm))
            if plan.device == "cuda":
                torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------- engine

def random_model(plan: Plan):
    """A random-weight causal LM (Qwen2.5-7B's shape in bf16 on the GPU; tiny on the CPU) and a
    word-level tokenizer over its whole vocabulary, as a ``LoadedModel``."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    from lmcache_ext.serving.model import LoadedModel
    from lmcache_ext.serving.transformers_kv import layout_of
    context = max(plan.prompts) + 1024
    if plan.dry_run:
        config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=context)
        dtype = torch.float32
    else:  # Qwen2.5-7B-Instruct's config.json, context widened to fit the prompts
        config = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                             num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                             max_position_embeddings=context, rope_theta=1e6, rms_norm_eps=1e-6,
                             tie_word_embeddings=False)
        dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    return LoadedModel("gpu-check-random", model, tokenizer, layout_of(config, dtype), context)


def bench_engine(plan: Plan) -> list[dict]:
    """Cold vs warm TTFT through the built-in engine's generator, output compared."""
    from lmcache_ext.config import load_config
    from lmcache_ext.engine import CacheEngine
    from lmcache_ext.serving.generator import GenerationStats, Generator, SamplingParams
    loaded = random_model(plan)
    kv_gib = sum(plan.prompts) * loaded.layout.num_layers * 2 * loaded.layout.num_kv_heads * \
        loaded.layout.head_dim * loaded.layout.dtype.itemsize / 2 ** 30
    config = load_config(env={}, overrides={"chunk_size": CHUNK_TOKENS,
                                            "max_local_cpu_size": round(kv_gib * 1.5 + 0.1, 2)})
    engine = CacheEngine(config, loaded.layout, loaded.name)
    generator = Generator(loaded, engine, CHUNK_TOKENS)
    params = SamplingParams(max_new_tokens=plan.new_tokens)

    def run(ids: list[int]) -> tuple[GenerationStats, list[int]]:
        stats = GenerationStats()
        tokens = [event.token_id for event in generator.generate(ids, params, stats)]
        return stats, tokens

    rng = torch.Generator().manual_seed(1)
    run(torch.randint(0, loaded.tokenizer.vocab_size, (300,), generator=rng).tolist())  # warm-up
    rows = []
    for length in plan.prompts:
        ids = torch.randint(0, loaded.tokenizer.vocab_size, (length,), generator=rng).tolist()
        cold, cold_tokens = run(ids)
        first, first_tokens = run(ids)
        warm, warm_tokens = run(ids)
        rows.append({"prompt_tokens": length, "cold_ttft_s": round(cold.ttft_s, 4),
                     "warm_first_ttft_s": round(first.ttft_s, 4),
                     "warm_ttft_s": round(warm.ttft_s, 4), "loaded_tokens": warm.loaded_tokens,
                     "warm_over_cold": round(warm.ttft_s / cold.ttft_s, 4),
                     "output_equal": cold_tokens == first_tokens == warm_tokens})
    engine.close()
    return rows


# ---------------------------------------------------------------------------------- report

def _worst(rows: list[dict], key: str, at_least: bool) -> float | None:
    values = [row[key] for row in rows if key in row]
    return None if not values else (min(values) if at_least else max(values))


def verdicts(result: dict) -> list[dict]:
    """Each target: the worst measured ratio over all shapes, and pass/fail."""
    data, engine = result.get("data_path", []), result.get("engine", [])
    out = []
    for name, key, sense, bound in TARGETS:
        if key == "warm_over_cold_32k":
            value = _worst([{key: r["warm_over_cold"]} for r in engine
                            if r["prompt_tokens"] == max(r2["prompt_tokens"] for r2 in engine)],
                           key, False) if engine else None
        else:
            value = _worst(data, key, True)
        ok = None if value is None else value >= bound if sense == ">=" else value <= bound
        out.append({"target": name, "value": value, "bound": bound, "pass": ok})
    if "tests" in result:
        out.append({"target": "cuda tests pass", "value": result["tests"]["passed"],
                    "bound": True, "pass": result["tests"]["passed"]})
    if engine:
        equal = all(r["output_equal"] for r in engine)
        out.append({"target": "warm output == cold", "value": equal, "bound": True,
                    "pass": equal})
    return out


def print_report(result: dict) -> None:
    for row in result.get("data_path", []):
        print(f"{row['shape']:>9} vLLM {row['vllm_layout']} {row['chunk_mib']:7.2f} MiB  "
              + "  ".join(f"{k} {v:8.3f}" for k, v in row["gbps"].items()) + "  GB/s")
    for row in result.get("engine", []):
        print(f"engine {row['prompt_tokens']:>6} tokens: cold {row['cold_ttft_s']:.3f} s, warm "
              f"{row['warm_first_ttft_s']:.3f} / {row['warm_ttft_s']:.3f} s, output equal "
              f"{row['output_equal']}")
    print(f"\n{'target':<34} {'measured':>10} {'result':>7}")
    for v in result["verdicts"]:
        shown = "n/a" if v["value"] is None else v["value"]
        verdict = "n/a" if v["pass"] is None else "PASS" if v["pass"] else "FAIL"
        print(f"{v['target']:<34} {shown!s:>10} {verdict:>7}")
    if result["dry_run"]:
        print("(dry run on the CPU: the ratios are not the GPU's; only the logic is checked)")


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", help="JSON path (default $OUT/gpu_check.json, else ./)")
    parser.add_argument("--skip", default="", help=f"comma-separated of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    skip = set(filter(None, re.split(r"[,\s]+", args.skip)))
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (torch.cuda.is_available() is False); "
                         "use --dry-run on a machine without a GPU")
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton_paged is imported
    plan = Plan.make(args.dry_run)
    result: dict = {"dry_run": plan.dry_run, "plan": asdict(plan), "environment": environment()}
    for section, fn in (("tests", run_tests), ("data_path", bench_data_path),
                        ("engine", bench_engine)):
        if section not in skip:
            began = time.perf_counter()
            result[section] = fn(plan)
            result.setdefault("seconds", {})[section] = round(time.perf_counter() - began, 1)
    result["verdicts"] = verdicts(result)
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print_report(result)
    print(f"\nwritten: {out}")
    return result


def failed(result: dict) -> list[str]:
    """Targets that failed; a dry run judges only correctness (tests, equal output), not speed."""
    logic = {"cuda tests pass", "warm output == cold"}
    return [v["target"] for v in result["verdicts"] if v["pass"] is False
            and (not result["dry_run"] or v["target"] in logic)]


if __name__ == "__main__":
    sys.exit(1 if failed(main()) else 0)
