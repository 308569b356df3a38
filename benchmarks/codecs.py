"""Chunk codec benchmark: quality on a real model (SmolLM2 in the built-in engine), size, speed.

For each quantized codec (``int8``, ``int4``), beside raw KV:
- ``ppl_delta``: perplexity of a held-out continuation when the preceding context's KV went
  through the codec (chunk by chunk, as a tier stores it), relative to the same with raw KV:
  ``ppl_codec / ppl_raw - 1`` (0.005 = 0.5 % worse);
- ``greedy_agreement``: the share of 32 greedy new tokens, position by position, equal to those
  generated from raw KV, averaged over N prompts (the KV of each prompt but its last token
  through the codec);
- ``bytes_ratio``: a 256-token chunk's bytes in the model's dtype (bfloat16) / its encoded bytes;
- ``encode_gbps`` / ``decode_gbps``: GB of bfloat16 KV per second on one thread (one core).
``encrypted_get_vs_raw``: a sealed (AES-256-GCM) remote tier's get of a 256-token raw chunk,
open and check included, over raw redis-py GET of the same bytes on the same redis-server
(throughput ratio; medians of interleaved rounds).

The text is the repository's own prose (README and docs), tokenized; windows of it are the
contexts and prompts. The built-in engine runs the model in float32; its KV goes through the
codec as the engine would store it.

    python benchmarks/codecs.py [--quick] [--json PATH]

``--quick``: 512 context + 128 continuation tokens, 3 prompts of 256 tokens (minutes on 2 CPU
cores); else 3072 + 1024 tokens and 20 prompts of 1024 tokens.
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

from lmcache_ext.adapters.transformers_kv import cache_to_kv, kv_to_cache  # noqa: E402
from lmcache_ext.chunk import ChunkMeta  # noqa: E402
from lmcache_ext.codecs import CODECS, ChunkSealer  # noqa: E402
from lmcache_ext.keys import ChunkKey  # noqa: E402
from lmcache_ext.storage import Chunk  # noqa: E402
from lmcache_ext.storage.redis_url import parse_redis_url  # noqa: E402
from lmcache_ext.storage.remote import RemoteSettings, RemoteTier  # noqa: E402
from lmcache_ext.testing.redis_server import RedisServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHUNK_TOKENS = 256
QUANTIZED = ("int8", "int4")
SETTINGS = {  # token counts; speed rounds. "smoke" is the test's: it checks the JSON's keys.
    "smoke": dict(context=256, continuation=32, prompts=1, prompt_tokens=64, new_tokens=2,
                  rounds=1),
    "quick": dict(context=512, continuation=128, prompts=3, prompt_tokens=256, new_tokens=32,
                  rounds=3),
    "full": dict(context=3072, continuation=1024, prompts=20, prompt_tokens=1024, new_tokens=32,
                 rounds=7),
}


def corpus_ids(tokenizer, needed: int) -> list[int]:
    """The repository's prose as token ids, at least ``needed`` of them (repeated if short)."""
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.exists())
    ids = tokenizer(text)["input_ids"]
    while len(ids) < needed:
        ids = ids + ids
    return ids


def through(codec_name: str, kv: torch.Tensor) -> torch.Tensor:
    """``kv`` after a tier's round trip with the codec, chunk by chunk (raw: itself)."""
    codec = CODECS[codec_name]
    if codec is None:
        return kv
    out = torch.empty_like(kv)
    for start in range(0, kv.shape[2], CHUNK_TOKENS):
        piece = kv[:, :, start:start + CHUNK_TOKENS].contiguous()
        out[:, :, start:start + CHUNK_TOKENS] = codec.decode(codec.encode(piece),
                                                             ChunkMeta.of(piece))
    return out


def prefill_kv(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        result = model(input_ids=torch.tensor([ids]), use_cache=True)
    return cache_to_kv(result.past_key_values, 0, len(ids))


def continuation_nll(model, kv: torch.Tensor, continuation: list[int]) -> float:
    """Mean negative log-likelihood of ``continuation[1:]`` after the context in ``kv``."""
    cache = kv_to_cache(kv, kv.shape[2], model.config)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([continuation]), past_key_values=cache).logits[0]
    targets = torch.tensor(continuation[1:])
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), targets))


def greedy(model, kv: torch.Tensor, last: int, new_tokens: int) -> list[int]:
    cache = kv_to_cache(kv, kv.shape[2], model.config)
    token, out = last, []
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
    return out


def quality(model, ids: list[int], setting: dict) -> dict[str, dict]:
    """ppl_delta and greedy_agreement of each quantized codec."""
    context, continuation = ids[:setting["context"]], \
        ids[setting["context"]:setting["context"] + setting["continuation"]]
    kv = prefill_kv(model, context)
    nll = {name: continuation_nll(model, through(name, kv), continuation)
           for name in ("raw", *QUANTIZED)}
    agree = {name: [] for name in QUANTIZED}
    length = setting["prompt_tokens"]
    stride = max(1, (len(ids) - length) // setting["prompts"])
    for index in range(setting["prompts"]):
        prompt = ids[index * stride:index * stride + length]
        prompt_kv = prefill_kv(model, prompt[:-1])
        new = setting["new_tokens"]
        want = greedy(model, prompt_kv, prompt[-1], new)
        for name in QUANTIZED:
            got = greedy(model, through(name, prompt_kv), prompt[-1], new)
            agree[name].append(sum(a == b for a, b in zip(got, want, strict=True)) / new)
    return {name: {"ppl_delta": float(torch.tensor(nll[name] - nll["raw"]).exp()) - 1,
                   "greedy_agreement": statistics.mean(agree[name]),
                   "ppl": float(torch.tensor(nll[name]).exp()),
                   "ppl_raw": float(torch.tensor(nll["raw"]).exp())}
            for name in QUANTIZED}


def speed(layout, rounds: int) -> dict[str, dict]:
    """bytes_ratio and one-thread encode/decode GB/s of bfloat16 KV (a 256-token chunk)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kv = torch.randn(layout.shape(CHUNK_TOKENS)).to(torch.bfloat16)
        meta = ChunkMeta.of(kv)
        out = {}
        for name in QUANTIZED:
            codec = CODECS[name]
            encoded = codec.encode(kv)
            encode_s = _median(lambda c=codec: c.encode(kv), rounds)
            decode_s = _median(lambda c=codec, e=encoded: c.decode(e, meta), rounds)
            out[name] = {"bytes_ratio": meta.nbytes / codec.encoded_size(meta),
                         "encode_gbps": meta.nbytes / encode_s / 1e9,
                         "decode_gbps": meta.nbytes / decode_s / 1e9}
        return out
    finally:
        torch.set_num_threads(threads)


def encrypted_get_vs_raw(layout, rounds: int) -> float:
    """Throughput of a sealed tier's get over raw redis-py GET of the same bytes (ratio)."""
    server = RedisServer(Path(tempfile.mkdtemp(prefix="codecs-bench-"))).start()
    try:
        settings = RemoteSettings(parse_redis_url(server.url), key_prefix="bench",
                                  timeout_s=10.0, sealer=ChunkSealer(b"codecs-bench-" + b"s" * 32))
        tier = RemoteTier(settings)
        key = ChunkKey("bench00000000000", b"codecs".ljust(32, b"\0"))
        tier.put(key, Chunk(torch.randn(layout.shape(CHUNK_TOKENS)).to(torch.bfloat16)))
        raw = tier._connect()  # the tier's own client: the same pool, parser and server
        name = tier.key_name(key)
        raw.set(b"raw", raw.get(name))  # the same bytes

        def sealed_get() -> None:
            with tier.get(key) as lease:
                assert lease.chunk.kv.numel()

        raw_s, sealed_s = [], []
        for _ in range(rounds * 3):
            raw_s.append(_timed(lambda: raw.get(b"raw")))
            sealed_s.append(_timed(sealed_get))
        tier.close()
        return statistics.median(raw_s) / statistics.median(sealed_s)
    finally:
        server.stop()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median(fn, rounds: int) -> float:
    fn()  # warm
    return statistics.median(_timed(fn) for _ in range(rounds))


def run(setting_name: str) -> dict:
    """Every figure of ``SETTINGS[setting_name]`` (see the module docstring), as the JSON."""
    from lmcache_ext.serving.model import load_model  # transformers: only when run
    setting = SETTINGS[setting_name]
    loaded = load_model()
    ids = corpus_ids(loaded.tokenizer, setting["context"] + setting["continuation"])
    codecs = quality(loaded.model, ids, setting)
    for name, figures in speed(loaded.layout, setting["rounds"]).items():
        codecs[name].update(figures)
    return {"model": loaded.name, "setting": setting_name, **setting,
            "codecs": codecs, "encrypted_get_vs_raw": encrypted_get_vs_raw(loaded.layout,
                                                                           setting["rounds"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small setting (minutes)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the figures as JSON to PATH (or stdout without one)")
    args = parser.parse_args(argv)
    result = run("quick" if args.quick else "full")
    print(f"{result['model']}, {result['setting']}: context {result['context']}, continuation "
          f"{result['continuation']}, {result['prompts']} prompts of {result['prompt_tokens']}",
          file=sys.stderr)
    print(f"{'codec':6} {'ppl_delta':>10} {'greedy':>7} {'bytes_x':>8} {'enc GB/s':>9} "
          f"{'dec GB/s':>9}", file=sys.stderr)
    for name, f in result["codecs"].items():
        print(f"{name:6} {f['ppl_delta']:>10.4f} {f['greedy_agreement']:>7.3f} "
              f"{f['bytes_ratio']:>8.2f} {f['encode_gbps']:>9.3f} {f['decode_gbps']:>9.3f}",
              file=sys.stderr)
    print(f"encrypted_get_vs_raw {result['encrypted_get_vs_raw']:.3f}", file=sys.stderr)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
