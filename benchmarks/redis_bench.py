"""Redis tier benchmark: the remote tier's put/get beside raw redis-py (hiredis) SET/GET of the same
bytes on the same server.

For 256-token chunks shaped like a 7B model's KV and like SmolLM2-135M's, each round does raw SET,
tier put, raw GET and tier get of the same values (header + payload, so the same byte count), in
that order; rounds are interleaved so noise hits all four alike, and each figure is the median
over rounds. The tier's get includes the checksum check and the zero-copy ``torch.frombuffer``
wrap; raw GET ends with the bytes. Headline figures are the 7B shape's.

    python benchmarks/redis_bench.py [--quick] [--json PATH] [--redis-url URL]

Without ``--redis-url`` it starts its own redis-server on a free loopback port (no persistence).
``measure_redis(quick)`` is the entry point for ``data_path.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmcache_ext.chunk import KVLayout, encode_header, payload_view  # noqa: E402
from lmcache_ext.keys import ChunkKey  # noqa: E402
from lmcache_ext.storage import Chunk  # noqa: E402
from lmcache_ext.storage.redis_url import parse_redis_url  # noqa: E402
from lmcache_ext.storage.remote import RemoteSettings, RemoteTier  # noqa: E402
from lmcache_ext.testing.redis_server import RedisServer  # noqa: E402

CHUNK_TOKENS = 256
SHAPES = {
    "7b": KVLayout(num_layers=28, num_kv_heads=4, head_dim=128, dtype=torch.bfloat16),
    "smollm2-135m": KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16),
}


def _key(shape: str, index: int) -> ChunkKey:
    return ChunkKey("bench00000000000", f"{shape}-{index}".encode().ljust(32, b"\0"))


def _median_gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_shape(url: str, name: str, layout: KVLayout, num_chunks: int, rounds: int) -> dict:
    """Interleaved rounds of raw SET, tier put, raw GET, tier get over ``num_chunks`` chunks."""
    tier = RemoteTier(RemoteSettings(parse_redis_url(url), key_prefix="bench", timeout_s=10.0))
    raw = tier._connect()  # the tier's own client: the same pool, hiredis parser and server
    chunks = [Chunk(torch.randn(layout.shape(CHUNK_TOKENS)).to(layout.dtype))
              for _ in range(num_chunks)]
    keys = [_key(name, i) for i in range(num_chunks)]
    values = [encode_header(k, c.meta, payload_view(c.kv)) + payload_view(c.kv).numpy().tobytes()
              for k, c in zip(keys, chunks, strict=True)]
    raw_names = [f"raw:{i}" for i in range(num_chunks)]
    total = sum(len(v) for v in values)

    def tier_get() -> None:
        for k in keys:
            with tier.get(k) as lease:
                assert lease.chunk.kv.numel()  # the wrapped tensor, not yet copied anywhere

    steps = {
        "raw_put": lambda: [raw.set(n, v) for n, v in zip(raw_names, values, strict=True)],
        "put": lambda: [tier.put(k, c) for k, c in zip(keys, chunks, strict=True)],
        "raw_get": lambda: [raw.get(n) for n in raw_names],
        "get": tier_get,
    }
    times: dict[str, list[float]] = {step: [] for step in steps}
    for round_index in range(rounds + 1):
        for step, fn in steps.items():
            seconds = _timed(fn)
            if round_index:  # round 0 warms connections and server memory
                times[step].append(seconds)
    raw.delete(*raw_names, *[tier.key_name(k) for k in keys])
    tier.close()
    result = {step: _median_gbps(total, seconds) for step, seconds in times.items()}
    result["chunk_bytes"] = len(values[0])
    result["get_vs_raw"] = result["get"] / result["raw_get"]
    return result


def measure_redis(quick: bool, redis_url: str | None = None) -> dict:
    """Remote tier vs raw redis-py GB/s for both chunk shapes; starts a server unless given one."""
    num_chunks, rounds = (4, 5) if quick else (8, 11)
    server = None
    if redis_url is None:
        server = RedisServer(Path(tempfile.mkdtemp(prefix="redis-bench-"))).start()
        redis_url = server.url
    try:
        shapes = {name: bench_shape(redis_url, name, layout, num_chunks, rounds)
                  for name, layout in SHAPES.items()}
    finally:
        if server is not None:
            server.stop()
    head = shapes["7b"]
    return {
        "redis_get_gbps": head["get"], "redis_put_gbps": head["put"],
        "raw_redis_get_gbps": head["raw_get"], "raw_redis_put_gbps": head["raw_put"],
        "redis_get_vs_raw": head["get_vs_raw"], "redis_shapes": shapes,
        "redis_chunks_per_round": num_chunks, "redis_rounds": rounds,
    }


def print_table(result: dict) -> None:
    print(f"{'shape':<14} {'MB':>6} {'put':>7} {'raw SET':>8} {'get':>7} {'raw GET':>8} "
          f"{'get/raw':>8}   (GB/s, median of {result['redis_rounds']} rounds)")
    for name, row in result["redis_shapes"].items():
        print(f"{name:<14} {row['chunk_bytes'] / 1e6:>6.2f} {row['put']:>7.2f} "
              f"{row['raw_put']:>8.2f} {row['get']:>7.2f} {row['raw_get']:>8.2f} "
              f"{row['get_vs_raw']:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer chunks and rounds")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--redis-url", help="use this server instead of starting one")
    args = parser.parse_args(argv)
    result = measure_redis(args.quick, args.redis_url)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
