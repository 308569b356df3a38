"""Redis tier benchmark: the remote tier's put/get, unkeyed and keyed, beside raw redis-py
(hiredis) SET/GET of the same bytes on the same server.

For 256-token chunks shaped like a 7B model's KV and like SmolLM2-135M's, each round does raw SET,
tier put, keyed tier put, raw GET, tier get and keyed tier get of the same values (header +
payload, so the same byte count), in that order; rounds are interleaved so noise hits all six
alike, and each figure is the median over rounds. The tier's get includes the checksum check (the
keyed tier's: the BLAKE3 keyed tag), read straight into a reused buffer (``remote_wire``); raw
GET ends with the bytes redis-py returns. Headline figures are the 7B shape's. It also times the
candidate tags over one 7B chunk (14.7 MB) in the same run: BLAKE3 keyed (what the keyed tier
uses), HMAC-SHA256, and the unkeyed xxh3-64 checksum for reference.

    python benchmarks/redis_bench.py [--quick] [--json PATH] [--redis-url URL]

Without ``--redis-url`` it starts its own redis-server on a free loopback port (no persistence).
``measure_redis(quick)`` is the entry point for ``data_path.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmcache_ext.chunk import (  # noqa: E402
    FIELDS_SIZE,
    ChunkAuth,
    ChunkMeta,
    KVLayout,
    encode_header,
    payload_view,
)
from lmcache_ext.keys import ChunkKey  # noqa: E402
from lmcache_ext.storage import Chunk  # noqa: E402
from lmcache_ext.storage.redis_url import parse_redis_url  # noqa: E402
from lmcache_ext.storage.remote import RemoteSettings, RemoteTier  # noqa: E402
from lmcache_ext.testing.redis_server import RedisServer  # noqa: E402

CHUNK_TOKENS = 256
BENCH_SECRET = b"redis-bench-secret-" + b"x" * 32  # a throwaway key, for timing only
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
    keyed = RemoteTier(RemoteSettings(parse_redis_url(url), key_prefix="bench-keyed",
                                      timeout_s=10.0, auth=ChunkAuth(BENCH_SECRET)))
    raw = tier._connect()  # the tier's own client: the same pool, hiredis parser and server
    chunks = [Chunk(torch.randn(layout.shape(CHUNK_TOKENS)).to(layout.dtype))
              for _ in range(num_chunks)]
    keys = [_key(name, i) for i in range(num_chunks)]
    values = [encode_header(k, c.meta, payload_view(c.kv)) + payload_view(c.kv).numpy().tobytes()
              for k, c in zip(keys, chunks, strict=True)]
    raw_names = [f"raw:{i}" for i in range(num_chunks)]
    total = sum(len(v) for v in values)

    def tier_get(which: RemoteTier) -> None:
        for k in keys:
            with which.get(k) as lease:
                assert lease.chunk.kv.numel()  # the read buffer's view, not yet copied anywhere

    steps = {
        "raw_put": lambda: [raw.set(n, v) for n, v in zip(raw_names, values, strict=True)],
        "put": lambda: [tier.put(k, c) for k, c in zip(keys, chunks, strict=True)],
        "keyed_put": lambda: [keyed.put(k, c) for k, c in zip(keys, chunks, strict=True)],
        "raw_get": lambda: [raw.get(n) for n in raw_names],
        "get": lambda: tier_get(tier),
        "keyed_get": lambda: tier_get(keyed),
    }
    times: dict[str, list[float]] = {step: [] for step in steps}
    for round_index in range(rounds + 1):
        for step, fn in steps.items():
            seconds = _timed(fn)
            if round_index:  # round 0 warms connections and server memory
                times[step].append(seconds)
    raw.delete(*raw_names, *[tier.key_name(k) for k in keys], *[keyed.key_name(k) for k in keys])
    tier.close()
    keyed.close()
    result = {step: _median_gbps(total, seconds) for step, seconds in times.items()}
    result["chunk_bytes"] = len(values[0])
    result["get_vs_raw"] = result["get"] / result["raw_get"]
    result["keyed_get_vs_raw"] = result["keyed_get"] / result["raw_get"]
    return result


def measure_tags(layout: KVLayout, rounds: int) -> dict:
    """GB/s of each candidate tag over one chunk's header fields + payload, interleaved rounds,
    median: BLAKE3 keyed (``ChunkAuth.sign``, the keyed tier's), HMAC-SHA256 (Python's hmac over
    OpenSSL), and the unkeyed xxh3-64 checksum (version 1) for reference."""
    payload = payload_view(torch.randn(layout.shape(CHUNK_TOKENS)).to(layout.dtype))
    fields = bytes(FIELDS_SIZE)  # the header fields the tag covers, with the payload
    auth = ChunkAuth(BENCH_SECRET)
    hmac_key = hashlib.sha256(BENCH_SECRET).digest()
    buffer = payload.numpy()

    def hmac_sha256() -> None:
        mac = hmac.new(hmac_key, fields, hashlib.sha256)
        mac.update(buffer)
        mac.digest()

    steps = {
        "blake3_keyed": lambda: auth.sign(fields, payload),
        "hmac_sha256": hmac_sha256,
        "xxh3_64": lambda: encode_header(_key("tag", 0), ChunkMeta.of(
            payload.view(layout.dtype).view(layout.shape(CHUNK_TOKENS))), payload),
    }
    times: dict[str, list[float]] = {step: [] for step in steps}
    for round_index in range(rounds + 1):
        for step, fn in steps.items():
            seconds = _timed(fn)
            if round_index:
                times[step].append(seconds)
    nbytes = payload.numel() + len(fields)
    result = {f"tag_{step}_gbps": _median_gbps(nbytes, seconds) for step, seconds in times.items()}
    result["tag_chunk_bytes"] = nbytes
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
        "redis_get_keyed_gbps": head["keyed_get"], "redis_put_keyed_gbps": head["keyed_put"],
        "raw_redis_get_gbps": head["raw_get"], "raw_redis_put_gbps": head["raw_put"],
        "redis_get_vs_raw": head["get_vs_raw"],
        "redis_get_keyed_vs_raw": head["keyed_get_vs_raw"], "redis_shapes": shapes,
        "redis_chunks_per_round": num_chunks, "redis_rounds": rounds,
        **measure_tags(SHAPES["7b"], rounds),
    }


def print_table(result: dict) -> None:
    print(f"{'shape':<14} {'MB':>6} {'put':>7} {'k.put':>7} {'raw SET':>8} {'get':>7} "
          f"{'k.get':>7} {'raw GET':>8} {'get/raw':>8} {'k.get/raw':>10}   "
          f"(GB/s, median of {result['redis_rounds']} rounds; k. = keyed)")
    for name, row in result["redis_shapes"].items():
        print(f"{name:<14} {row['chunk_bytes'] / 1e6:>6.2f} {row['put']:>7.2f} "
              f"{row['keyed_put']:>7.2f} {row['raw_put']:>8.2f} {row['get']:>7.2f} "
              f"{row['keyed_get']:>7.2f} {row['raw_get']:>8.2f} {row['get_vs_raw']:>8.2f} "
              f"{row['keyed_get_vs_raw']:>10.2f}")
    print(f"tags over one {result['tag_chunk_bytes'] / 1e6:.1f} MB chunk (GB/s): BLAKE3 keyed "
          f"{result['tag_blake3_keyed_gbps']:.2f}, HMAC-SHA256 {result['tag_hmac_sha256_gbps']:.2f}"
          f", xxh3-64 (unkeyed) {result['tag_xxh3_64_gbps']:.2f}")


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
