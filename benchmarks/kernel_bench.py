"""Gather/scatter benchmark: the CPU path between vLLM-style paged KV and chunk buffers, beside
memcpy of the same bytes, one 256-token chunk per call as the connector copies them.

Every combination of two model shapes (7B: 28 layers, 4 KV heads, head_dim 128; SmolLM2-135M:
30 layers, 3 KV heads, head_dim 64), block size 16 and 128 (vLLM's CPU backend uses 128), the
layouts PACKED (one LBNHC buffer, per-layer ``[blocks, heads, block_size, 2 * head_dim]`` views,
non-contiguous, as vLLM >= 0.26 allocates them) and CPU_BLOCKED (one LBHNC buffer, as vLLM's CPU
backend allocates it) and dtypes bf16 and fp32. The request's blocks are scattered over a cache
twice its size in a shuffled order, as after a while of serving. Gather = paged views ->
``[layers, 2, tokens, heads, dim]`` (a store); scatter = back (a load); memcpy = a contiguous
copy of each chunk. The three are timed one after the other on each chunk, round after round,
so machine noise hits them alike; each figure is the median over all chunks and rounds, after a
warm-up pass. Also: the per-call time of a
near-empty chunk (the plan and launch overhead), and the old per-token path on the first
combination.

    python benchmarks/kernel_bench.py [--quick] [--json PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmcache_ext import kernels  # noqa: E402
from lmcache_ext.kernels import PagedLayout, paged_kv_layers, reference  # noqa: E402

CHUNK_TOKENS = 256
SHAPES = {"7b": (28, 4, 128), "smollm2-135m": (30, 3, 64)}  # layers, kv heads, head_dim
BLOCK_SIZES = (16, 128)
LAYOUTS = (PagedLayout.PACKED, PagedLayout.CPU_BLOCKED)
DTYPES = (torch.bfloat16, torch.float32)


def _paged_cache(layout: PagedLayout, shape: tuple[int, int, int], num_blocks: int,
                 block_size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per-layer [B, H, N, 2D] views over one buffer: LBNHC (PACKED) or LBHNC (CPU_BLOCKED)."""
    layers, heads, dim = shape
    if layout is PagedLayout.PACKED:
        flat = torch.randn(layers, num_blocks, block_size, heads, 2 * dim).to(dtype)
        return [flat[layer].permute(0, 2, 1, 3) for layer in range(layers)]
    flat = torch.randn(layers, num_blocks, heads, block_size, 2 * dim).to(dtype)
    return list(flat)


def _slots(num_tokens: int, num_blocks: int, block_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(num_blocks, generator=generator)[:-(-num_tokens // block_size)]
    positions = torch.arange(num_tokens)
    return blocks[positions // block_size] * block_size + positions % block_size


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _medians(copies: dict[str, list[Callable[[], object]]], rounds: int) -> dict[str, float]:
    """Median seconds of each copy, ``copies[name][i]`` being its call on chunk ``i``: every
    round times chunk by chunk, the copies one after the other on the same chunk, so that
    machine noise hits all of them alike; after one warm-up pass."""
    for calls in copies.values():
        for fn in calls:
            fn()  # warm-up: pages touched, allocator primed
    times: dict[str, list[float]] = {name: [] for name in copies}
    for _ in range(rounds):
        for index in range(len(next(iter(copies.values())))):
            for name, calls in copies.items():
                times[name].append(_seconds(calls[index]))
    return {name: statistics.median(t) for name, t in times.items()}


def measure_combo(shape: str, layout: PagedLayout, dtype: torch.dtype, block_size: int,
                  num_tokens: int, rounds: int, per_token: bool = False) -> dict:
    """GB/s and us per 256-token chunk of gather, scatter and memcpy for one combination, and
    the ratios to memcpy; ``per_token`` adds the old per-token path (``reference``)."""
    layers, heads, dim = SHAPES[shape]
    num_blocks = 2 * -(-num_tokens // block_size)
    views = paged_kv_layers(_paged_cache(layout, SHAPES[shape], num_blocks, block_size, dtype),
                            layout, heads, dim)
    slots = _slots(num_tokens, num_blocks, block_size).split(CHUNK_TOKENS)
    # chunks: [chunks, layers, 2, 256, heads, dim]; memcpy has buffers of its own, so that
    # its source is no warmer in the CPU caches than the paged blocks gather reads
    chunks = torch.empty((len(slots), layers, 2, CHUNK_TOKENS, heads, dim), dtype=dtype)
    source = torch.randn_like(chunks, dtype=torch.float32).to(dtype)
    copied = torch.empty_like(chunks)
    triples = list(zip(slots, chunks, zip(source, copied, strict=True), strict=True))
    copies: dict[str, list[Callable[[], object]]] = {
        "gather": [partial(kernels.gather, views, s, c) for s, c, _ in triples],
        "scatter": [partial(kernels.scatter, c, views, s) for s, c, _ in triples],
        "memcpy": [partial(d.copy_, m) for _, _, (m, d) in triples],
    }
    if per_token:
        copies["per_token_gather"] = [partial(reference.gather, views, s, c)
                                      for s, c, _ in triples]
        copies["per_token_scatter"] = [partial(reference.scatter, c, views, s)
                                       for s, c, _ in triples]
    per_chunk = _medians(copies, rounds)
    nbytes = chunks.numel() * chunks.element_size()
    figures = {"shape": shape, "layout": layout.value, "dtype": str(dtype).split(".")[-1],
               "block_size": block_size, "tokens": num_tokens, "bytes": nbytes}
    for name, value in per_chunk.items():
        figures[f"{name}_gbps"] = nbytes / len(slots) / value / 1e9
        figures[f"{name}_us_per_chunk"] = value * 1e6
        if name != "memcpy":
            figures[f"{name}_vs_memcpy"] = per_chunk["memcpy"] / value
    return figures


def measure_call_overhead(calls: int = 200, rounds: int = 5) -> dict[str, float]:
    """Microseconds per call for a near-empty 256-token chunk (30 layers, 1 head, head_dim 4,
    bf16, PACKED, block size 16): what planning and launching cost, with slots as one run (a
    fresh prompt's chunk) and as shuffled whole blocks; memcpy of the same chunk beside it."""
    views = paged_kv_layers(_paged_cache(PagedLayout.PACKED, (30, 1, 4), 64, 16, torch.bfloat16),
                            PagedLayout.PACKED, 1, 4)
    chunk = torch.zeros((30, 2, CHUNK_TOKENS, 1, 4), dtype=torch.bfloat16)
    copied = torch.empty_like(chunk)
    run, shuffled = torch.arange(16, 16 + CHUNK_TOKENS), _slots(CHUNK_TOKENS, 64, 16)
    copies = {
        "gather_one_run": lambda: kernels.gather(views, run, chunk),
        "scatter_one_run": lambda: kernels.scatter(chunk, views, run),
        "gather_shuffled": lambda: kernels.gather(views, shuffled, chunk),
        "scatter_shuffled": lambda: kernels.scatter(chunk, views, shuffled),
        "memcpy": lambda: copied.copy_(chunk),
    }
    looped = {name: [lambda fn=fn: [fn() for _ in range(calls)]] for name, fn in copies.items()}
    return {name: s / calls * 1e6 for name, s in _medians(looped, rounds).items()}


def measure_gather_scatter(quick: bool) -> dict:
    """Every combination (``combos``), the per-call overhead (``overhead_us``), and as the
    headline the first combination (7B, PACKED, bf16, block size 16) under the keys ``tokens,
    bytes, gather_gbps, scatter_gbps, memcpy_gbps, gather_vs_memcpy, scatter_vs_memcpy`` and
    the old per-token path's ``per_token_gather_vs_memcpy, per_token_scatter_vs_memcpy``.
    ``quick`` moves 1024 tokens (4 chunks) per round, 5 rounds (else 4096 tokens, 9)."""
    num_tokens, rounds = (1024, 5) if quick else (4096, 9)
    combos = [measure_combo(shape, layout, dtype, block_size, num_tokens, rounds,
                            per_token=index == 0)
              for index, (shape, block_size, layout, dtype) in enumerate(
                  itertools.product(SHAPES, BLOCK_SIZES, LAYOUTS, DTYPES))]
    headline = {k: v for k, v in combos[0].items() if k.endswith(("_gbps", "_vs_memcpy"))
                or k in ("tokens", "bytes")}
    return {**headline, "chunk_tokens": CHUNK_TOKENS, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "combos": combos, "overhead_us": measure_call_overhead()}


def format_table(figures: dict) -> str:
    """The figures of ``measure_gather_scatter`` as a text table."""
    lines = [f"paged KV <-> {figures['chunk_tokens']}-token chunk buffers, one call per chunk, "
             f"{figures['tokens']} tokens a round, torch {figures['torch']}, "
             f"{figures['threads']} threads (ratios: x memcpy of the same bytes, same run)",
             f"{'shape':<14}{'layout':<13}{'dtype':<10}{'block':>6}{'MB':>7}{'memcpy GB/s':>13}"
             f"{'gather':>8}{'scatter':>9}{'us/chunk g/s/mc':>19}"]
    for c in figures["combos"]:
        lines.append(f"{c['shape']:<14}{c['layout']:<13}{c['dtype']:<10}{c['block_size']:>6}"
                     f"{c['bytes'] / 1e6:>7.0f}{c['memcpy_gbps']:>13.2f}"
                     f"{c['gather_vs_memcpy']:>8.2f}{c['scatter_vs_memcpy']:>9.2f}"
                     f"{c['gather_us_per_chunk']:>7.0f}{c['scatter_us_per_chunk']:>6.0f}"
                     f"{c['memcpy_us_per_chunk']:>6.0f}")
    lines.append(f"old per-token path, first row: gather "
                 f"{figures['per_token_gather_vs_memcpy']:.2f}, scatter "
                 f"{figures['per_token_scatter_vs_memcpy']:.2f} x memcpy")
    lines.append("us per call, near-empty 256-token chunk (30 layers): " + ", ".join(
        f"{name} {us:.1f}" for name, us in figures["overhead_us"].items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and rounds")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)."
                        " On a shared machine, 1 avoids OpenMP spin-waits that slow the "
                        "index copies many times over")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = measure_gather_scatter(args.quick)
    print(format_table(figures))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
