"""Data-path benchmark: the cache's copies beside the hardware's limit, in one run.

For 256-token chunks shaped like a 7B model's KV and like SmolLM2-135M's it measures memcpy of
the same bytes (the limit), CPU-tier store and retrieve (tier level, and through the engine with
the real strided ``[layers, 2, tokens, heads, dim]`` layout), their ratios to memcpy, key hashing
throughput, and lookup time per query with 1K, 100K (and 1M, without --quick) chunk keys known.
Rounds of memcpy, store and retrieve are interleaved so machine noise hits all of them alike;
each figure is the median over rounds. Buffers are warm (timed after a warm-up pass).

    python benchmarks/data_path.py [--quick] [--json PATH] [--disk-dir DIR | --no-disk] [--no-redis]

It also runs, in the same process, the kernel gather/scatter (kernel_bench.py), Redis tier vs
raw redis-py (redis_bench.py) and disk tier vs fio (disk_bench.py) measurements.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmcache_ext.chunk import KVLayout  # noqa: E402
from lmcache_ext.config import load_config  # noqa: E402
from lmcache_ext.engine import CacheEngine  # noqa: E402
from lmcache_ext.keys import ChunkKey, KeyNamespace, PrefixHasher  # noqa: E402
from lmcache_ext.storage import Chunk, CPUTier  # noqa: E402

CHUNK_TOKENS = 256


@dataclass(frozen=True)
class Shape:
    name: str
    layout: KVLayout

    def chunk_bytes(self) -> int:
        layout = self.layout
        return layout.num_layers * 2 * CHUNK_TOKENS * layout.num_kv_heads * layout.head_dim * 2


SHAPES = (
    Shape("7b", KVLayout(num_layers=28, num_kv_heads=4, head_dim=128, dtype=torch.bfloat16)),
    Shape("smollm2-135m", KVLayout(num_layers=30, num_kv_heads=3, head_dim=64,
                                   dtype=torch.bfloat16)),
)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_keys(count: int, salt: int = 0) -> list[ChunkKey]:
    return [ChunkKey("bench00000000000", hashlib.sha256(f"{salt}-{i}".encode()).digest())
            for i in range(count)]


# ---------------------------------------------------------------------------- tier level


def bench_tier(shape: Shape, num_chunks: int, rounds: int) -> dict:
    """memcpy vs CPUTier.put vs CPUTier.get + copy out, on contiguous chunk-sized tensors."""
    layout = shape.layout
    nbytes = shape.chunk_bytes()
    sources = [torch.randn(layout.shape(CHUNK_TOKENS)).to(layout.dtype) for _ in range(num_chunks)]
    dest = torch.empty((num_chunks, *layout.shape(CHUNK_TOKENS)), dtype=layout.dtype)
    copies = [torch.empty_like(s) for s in sources]  # memcpy targets, warm after round 0
    tier = CPUTier(num_chunks * nbytes)
    total = num_chunks * nbytes
    results: dict[str, list[float]] = {"memcpy": [], "store": [], "retrieve": []}

    def memcpy() -> None:
        for src, dst in zip(sources, copies, strict=True):
            dst.copy_(src)

    for round_index in range(rounds + 1):  # round 0 warms every buffer and is not counted
        keys = make_keys(num_chunks, salt=round_index)  # new keys: each put evicts and reuses

        def store(keys=keys) -> None:
            for key, src in zip(keys, sources, strict=True):
                tier.put(key, Chunk(src))

        def retrieve(keys=keys) -> None:
            for index, key in enumerate(keys):
                with tier.get(key) as lease:
                    dest[index].copy_(lease.chunk.kv)

        seconds = {"memcpy": timed(memcpy), "store": timed(store), "retrieve": timed(retrieve)}
        assert torch.equal(dest[-1], sources[-1])
        if round_index:
            for name, value in seconds.items():
                results[name].append(gbps(total, value))
    return {name: statistics.median(values) for name, values in results.items()}


# ---------------------------------------------------------------------------- engine level


def bench_engine(shape: Shape, num_chunks: int, rounds: int) -> dict:
    """engine.store / engine.retrieve of a whole prompt's KV in the real strided layout."""
    layout = shape.layout
    tokens_per_prompt = num_chunks * CHUNK_TOKENS
    kv = torch.randn(layout.shape(tokens_per_prompt)).to(layout.dtype)
    dest = torch.empty_like(kv)
    config = load_config(env={}, overrides={"max_local_cpu_size": 1.0})
    tier = CPUTier(num_chunks * shape.chunk_bytes())
    engine = CacheEngine(config, layout, model_name="bench", tiers=[tier])
    total = num_chunks * shape.chunk_bytes()
    results: dict[str, list[float]] = {"memcpy": [], "store": [], "retrieve": []}
    for round_index in range(rounds + 1):
        base = round_index * tokens_per_prompt
        tokens = list(range(base, base + tokens_per_prompt))
        seconds = {
            "memcpy": timed(lambda: dest.copy_(kv)),
            "store": timed(lambda tokens=tokens: engine.store(tokens, kv)),
            "retrieve": timed(lambda tokens=tokens: engine.retrieve(tokens, dest)),
        }
        assert torch.equal(dest, kv)
        if round_index:
            for name, value in seconds.items():
                results[name].append(gbps(total, value))
    engine.close()
    return {name: statistics.median(values) for name, values in results.items()}


# ---------------------------------------------------------------------------- keys and lookup


def bench_hashing(num_tokens: int) -> float:
    namespace = KeyNamespace("bench", 28, 4, 128, "bfloat16", CHUNK_TOKENS)
    hasher = PrefixHasher(namespace)
    tokens = list(range(num_tokens))
    seconds = min(timed(lambda: hasher.spans(tokens)) for _ in range(3))
    return num_tokens / seconds


def bench_lookup(known_keys: int, queries: int = 2000) -> float:
    """Microseconds per engine.lookup of a 4K-token prompt (16 chunks, all hits) when the CPU
    tier's index holds ``known_keys`` chunk keys."""
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float16)
    tiny = torch.zeros(layout.shape(CHUNK_TOKENS), dtype=layout.dtype)  # 1 KiB a chunk
    tier = CPUTier((known_keys + 16) * tiny.numel() * 2)
    engine = CacheEngine(load_config(env={}), layout, model_name="bench", tiers=[tier])
    prompt = list(range(16 * CHUNK_TOKENS))
    engine.store(prompt, tiny.repeat(1, 1, 16, 1, 1))
    for key in make_keys(known_keys - 16):
        tier.put(key, Chunk(tiny))
    assert engine.lookup(prompt) == len(prompt)
    seconds = timed(lambda: [engine.lookup(prompt) for _ in range(queries)])
    engine.close()
    return seconds / queries * 1e6


# ---------------------------------------------------------------------------- report


def run(quick: bool, disk_dir: str | None, redis: bool = True) -> dict:
    num_chunks, rounds = (8, 5) if quick else (32, 9)
    report: dict = {"machine": f"{platform.node()} {os.cpu_count()} cpus, torch threads "
                               f"{torch.get_num_threads()}", "quick": quick, "shapes": {}}
    for shape in SHAPES:
        tier = bench_tier(shape, num_chunks, rounds)
        engine = bench_engine(shape, num_chunks, rounds)
        report["shapes"][shape.name] = {
            "chunk_bytes": shape.chunk_bytes(),
            "memcpy_gbps": tier["memcpy"], "cpu_store_gbps": tier["store"],
            "cpu_retrieve_gbps": tier["retrieve"],
            "store_vs_memcpy": tier["store"] / tier["memcpy"],
            "retrieve_vs_memcpy": tier["retrieve"] / tier["memcpy"],
            "engine_memcpy_gbps": engine["memcpy"], "engine_store_gbps": engine["store"],
            "engine_retrieve_gbps": engine["retrieve"],
            "engine_store_vs_memcpy": engine["store"] / engine["memcpy"],
            "engine_retrieve_vs_memcpy": engine["retrieve"] / engine["memcpy"],
        }
    report.update(report["shapes"][SHAPES[0].name])  # headline figures: the 7B shape
    report["hash_tokens_per_s"] = bench_hashing(1 << 20)
    counts = (1_000, 100_000) if quick else (1_000, 100_000, 1_000_000)
    report["lookup_us_by_keys"] = {str(n): bench_lookup(n) for n in counts}
    # The other data paths live in their own modules (each also runs alone).
    from kernel_bench import measure_gather_scatter
    from redis_bench import measure_redis

    report["kernels"] = measure_gather_scatter(quick)
    report.update({k: report["kernels"][k] for k in ("gather_gbps", "scatter_gbps",
                                                     "gather_vs_memcpy", "scatter_vs_memcpy")})
    if redis:
        report["redis"] = measure_redis(quick)
        report.update({k: v for k, v in report["redis"].items()
                       if k.startswith(("redis_", "raw_redis_", "tag_"))})
    if disk_dir:
        from disk_bench import measure_disk

        os.makedirs(disk_dir, exist_ok=True)
        report["disk"] = measure_disk(disk_dir, quick)
        report.update({k: v for k, v in report["disk"].items() if k.startswith(("disk_", "fio_"))
                       and not isinstance(v, dict | list)})
    return report


def print_table(report: dict) -> None:
    print(f"machine: {report['machine']}")
    print(f"{'shape':<14}{'memcpy':>9}{'store':>9}{'retr.':>9}{'st/mc':>7}{'rt/mc':>7}"
          f"{'eng.st':>9}{'eng.rt':>9}{'st/mc':>7}{'rt/mc':>7}   (GB/s, ratios)")
    for name, s in report["shapes"].items():
        print(f"{name:<14}{s['memcpy_gbps']:>9.2f}{s['cpu_store_gbps']:>9.2f}"
              f"{s['cpu_retrieve_gbps']:>9.2f}{s['store_vs_memcpy']:>7.2f}"
              f"{s['retrieve_vs_memcpy']:>7.2f}{s['engine_store_gbps']:>9.2f}"
              f"{s['engine_retrieve_gbps']:>9.2f}{s['engine_store_vs_memcpy']:>7.2f}"
              f"{s['engine_retrieve_vs_memcpy']:>7.2f}")
    print(f"hashing: {report['hash_tokens_per_s'] / 1e6:.1f} M tokens/s (sha256 chain)")
    lookups = ", ".join(f"{int(n):,} keys: {us:.1f} us" for n, us in
                        report["lookup_us_by_keys"].items())
    print(f"lookup of a 4K-token prompt: {lookups}")
    if "kernels" in report:
        from kernel_bench import format_table  # every combination of the paged copies

        print(format_table(report["kernels"]))
    for key in ("gather_gbps", "scatter_gbps", "gather_vs_memcpy", "scatter_vs_memcpy",
                "redis_get_gbps", "raw_redis_get_gbps", "redis_get_vs_raw", "redis_put_gbps",
                "raw_redis_put_gbps", "redis_get_keyed_gbps", "redis_get_keyed_vs_raw",
                "redis_put_keyed_gbps", "tag_blake3_keyed_gbps", "tag_hmac_sha256_gbps",
                "tag_xxh3_64_gbps", "disk_read_gbps", "disk_write_gbps", "fio_read_gbps",
                "disk_read_vs_fio", "disk_startup_s_10k"):
        if key in report:
            value = report[key]
            print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer chunks and rounds")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--disk-dir", default=os.path.join(os.getcwd(), ".bench-disk"),
                        help="directory on the disk to measure (default ./.bench-disk)")
    parser.add_argument("--no-disk", action="store_true", help="skip the disk tier")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis tier")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    report = run(args.quick, None if args.no_disk else args.disk_dir, not args.no_redis)
    print_table(report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
