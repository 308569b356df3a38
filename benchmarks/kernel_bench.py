"""Gather/scatter benchmark: the CPU reference path between vLLM-style paged KV and chunk buffers,
beside memcpy of the same bytes.

A 7B-shaped layer set (28 layers, 4 KV heads, head_dim 128, bf16, block size 16) in vLLM >= 0.26's
layout: one flat buffer in LBNHC order, per-layer ``[blocks, heads, block_size, 2 * head_dim]``
views (non-contiguous), the request's blocks scattered over a cache twice its size in a shuffled
order, as after a while of serving. Gather = paged views -> ``[layers, 2, tokens, heads, dim]``
(a store); scatter = back (a load). Rounds of the three copies are interleaved so machine noise
hits them alike; each figure is the median over rounds, after a warm-up pass.

    python benchmarks/kernel_bench.py [--quick] [--json PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmcache_ext.kernels import PagedLayout, paged_kv_layers, reference  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 28, 4, 128, 16
DTYPE = torch.bfloat16


def _paged_cache(num_blocks: int) -> list[torch.Tensor]:
    """Per-layer [B, H, N, 2D] views over one LBNHC buffer, as vLLM 0.33 allocates them."""
    flat = torch.randn(LAYERS, num_blocks, BLOCK_SIZE, KV_HEADS, 2 * HEAD_DIM).to(DTYPE)
    return [flat[layer].permute(0, 2, 1, 3) for layer in range(LAYERS)]


def _slots(num_tokens: int, num_blocks: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(num_blocks, generator=generator)[:-(-num_tokens // BLOCK_SIZE)]
    positions = torch.arange(num_tokens)
    return blocks[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_gather_scatter(quick: bool) -> dict:
    """GB/s of the reference gather and scatter and of memcpy of the same bytes, and the ratios.

    Keys: ``tokens, bytes, gather_gbps, scatter_gbps, memcpy_gbps, gather_vs_memcpy,
    scatter_vs_memcpy``. ``quick`` uses 1024 tokens and 3 rounds (else 4096 and 7).
    """
    num_tokens, rounds = (1024, 3) if quick else (4096, 7)
    num_blocks = 2 * -(-num_tokens // BLOCK_SIZE)
    views = paged_kv_layers(_paged_cache(num_blocks), PagedLayout.PACKED, KV_HEADS, HEAD_DIM)
    slots = _slots(num_tokens, num_blocks)
    chunk = torch.empty((LAYERS, 2, num_tokens, KV_HEADS, HEAD_DIM), dtype=DTYPE)
    src, dst = torch.randn_like(chunk, dtype=torch.float32).to(DTYPE), torch.empty_like(chunk)
    copies = {
        "gather": lambda: reference.gather(views, slots, chunk),
        "scatter": lambda: reference.scatter(chunk, views, slots),
        "memcpy": lambda: dst.copy_(src),
    }
    for fn in copies.values():
        fn()  # warm-up: pages touched, allocator primed
    times: dict[str, list[float]] = {name: [] for name in copies}
    for _ in range(rounds):
        for name, fn in copies.items():
            times[name].append(_seconds(fn))
    nbytes = chunk.numel() * chunk.element_size()
    gbps = {name: nbytes / statistics.median(t) / 1e9 for name, t in times.items()}
    return {
        "tokens": num_tokens, "bytes": nbytes,
        "gather_gbps": gbps["gather"], "scatter_gbps": gbps["scatter"],
        "memcpy_gbps": gbps["memcpy"],
        "gather_vs_memcpy": gbps["gather"] / gbps["memcpy"],
        "scatter_vs_memcpy": gbps["scatter"] / gbps["memcpy"],
    }


def _table(figures: dict) -> str:
    lines = [f"paged KV <-> chunk buffer, {LAYERS} layers x {KV_HEADS} kv heads x {HEAD_DIM} "
             f"head_dim, bf16, block size {BLOCK_SIZE}, {figures['tokens']} tokens "
             f"({figures['bytes'] / 1e6:.0f} MB), torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads",
             f"{'copy':<10}{'GB/s':>10}{'vs memcpy':>12}"]
    for name in ("gather", "scatter", "memcpy"):
        ratio = figures.get(f"{name}_vs_memcpy", 1.0)
        lines.append(f"{name:<10}{figures[f'{name}_gbps']:>10.2f}{ratio:>12.2f}")
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
    print(_table(figures))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
