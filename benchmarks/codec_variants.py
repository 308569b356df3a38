"""How far each KV-quantization variant moves a real model: the experiments behind the codecs.

``benchmarks/codecs.py`` measures the codecs as shipped; this compares the designs they were
chosen from, on SmolLM2 in the built-in engine (float32), each variant's KV beside raw KV:
- ``token_agreement`` / ``kl_per_token``: 32 positions after each prompt, teacher-forced with
  the raw KV's greedy tokens: the share whose top token is raw's, and the mean KL divergence
  (nats) of the next-token distribution from raw's;
- ``greedy_agreement`` (``_min``): 32 greedy tokens, position by position, against raw's (a
  prompt that flips at token k scores k/32), as the codecs benchmark counts it.

Variants other than the shipped codecs are quantized in float with the codecs' arithmetic
(asymmetric, round to nearest, float16 step and minimum per group, the largest-magnitude
``outliers`` share of the keys and of the values kept exact and out of the groups' ranges;
keys per channel over groups of tokens, values per token over groups of channels), chunk by
chunk (256 tokens) as a tier stores them. ``bits`` counts codes, scales and outliers.

    python benchmarks/codec_variants.py [--prompts N] [--layers] [--json PATH]

``--layers``: also each layer alone with int4 keys (then values), the rest raw (``by_layer``).
About 4 minutes for 10 prompts on one core (``--layers``: 2 more).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmcache_ext.chunk import ChunkMeta  # noqa: E402
from lmcache_ext.codecs import CODECS  # noqa: E402

CHUNK_TOKENS = 256
PROMPT_TOKENS, NEW_TOKENS, BATCH = 1024, 32, 5
SENSITIVE = (17, 18, 20, 23, 24)  # SmolLM2-135M's layers whose int4 keys move it most (--layers)

Transform = Callable[[torch.Tensor, int], torch.Tensor]  # (chunk KV, its first position) -> KV


def _codecs_bench():
    """``benchmarks/codecs.py`` (its name is the standard library's, so loaded by path)."""
    spec = importlib.util.spec_from_file_location("codecs_bench", REPO / "benchmarks" / "codecs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quantize(x: torch.Tensor, bits: int, per: str, group: int, outliers: float) -> torch.Tensor:
    """``x`` ``[layers, tokens, heads, dim]`` quantized and dequantized: ``per="channel"``
    (keys: groups of ``group`` tokens, padded by repeating the last) or ``"token"`` (values:
    groups of ``group`` channels)."""
    layers, tokens, heads, dim = x.shape
    if per == "channel" and tokens % group:
        pad = x[:, -1:].expand(layers, group - tokens % group, heads, dim)
        return quantize(torch.cat([x, pad], dim=1), bits, per, group, outliers)[:, :tokens]
    exact = torch.zeros(x.numel(), dtype=torch.bool)
    if outliers:
        exact[x.reshape(-1).abs().topk(max(1, int(x.numel() * outliers))).indices] = True
    exact = exact.reshape(x.shape)
    if per == "channel":
        shape, axis = (layers, tokens // group, group, heads, dim), 2
    else:
        shape, axis = (layers, tokens, heads, dim // group, group), 4
    xs, keep = x.reshape(shape), exact.reshape(shape)
    low = xs.masked_fill(keep, float("inf")).amin(axis, keepdim=True)
    high = xs.masked_fill(keep, float("-inf")).amax(axis, keepdim=True)
    low = torch.where(low.isinf(), torch.zeros_like(low), low)
    high = torch.where(high.isinf(), low, high)
    levels = 2 ** bits - 1
    step = ((high - low) / levels).half().float().clamp_min(1e-8)
    low = low.half().float()
    out = ((xs - low) / step).round().clamp(0, levels) * step + low
    return torch.where(keep, xs, out).reshape(x.shape)


def group_quant(key_bits: int, value_bits: int, key_group: int = 32, value_group: int = 32,
                outliers: float = 0.01, layers: tuple[int, ...] | None = None,
                other_key_bits: int | None = None) -> Transform:
    """Keys and values each at their bits (16: left raw); ``layers``: only those layers at
    ``key_bits`` keys, the others' keys at ``other_key_bits``."""
    def transform(kv: torch.Tensor, start: int) -> torch.Tensor:
        out = kv.clone()
        if layers is None:
            key_bits_of = [key_bits] * kv.shape[0]
        else:
            key_bits_of = [key_bits if layer in layers else other_key_bits
                           for layer in range(kv.shape[0])]
        for bits in set(key_bits_of) - {16}:
            rows = [layer for layer, b in enumerate(key_bits_of) if b == bits]
            out[rows, 0] = quantize(kv[rows, 0], bits, "channel", key_group, outliers)
        if value_bits < 16:
            out[:, 1] = quantize(kv[:, 1], value_bits, "token", value_group, outliers)
        return out
    return transform


def pre_rope(model, inner: Transform) -> Transform:
    """``inner`` applied to the keys with the rotary embedding taken off (the positions are the
    chunk's), then put back: per-channel groups see each channel unrotated (KVQuant)."""
    rotary = model.model.rotary_emb

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def transform(kv: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + kv.shape[2]).unsqueeze(0)
        cos, sin = rotary(torch.zeros(1), positions)
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [tokens, 1, dim]
        unrotated = kv.clone()
        unrotated[:, 0] = kv[:, 0] * cos - rotate_half(kv[:, 0]) * sin
        out = inner(unrotated, start)
        out[:, 0] = out[:, 0] * cos + rotate_half(out[:, 0]) * sin
        return out
    return transform


def shipped(name: str) -> Transform:
    codec = CODECS[name]
    return lambda kv, start: codec.decode(codec.encode(kv), ChunkMeta.of(kv))


def chunk_by_chunk(transform: Transform, raw_tail: int = 0) -> Callable[[torch.Tensor],
                                                                        torch.Tensor]:
    """A whole prompt's KV through ``transform`` a chunk at a time; the last ``raw_tail`` tokens
    left raw (as if recomputed after the cached prefix)."""
    def apply(kv: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(kv)
        for start in range(0, kv.shape[2], CHUNK_TOKENS):
            piece = kv[:, :, start:start + CHUNK_TOKENS].contiguous()
            out[:, :, start:start + CHUNK_TOKENS] = transform(piece, start)
        if raw_tail:
            out[:, :, -raw_tail:] = kv[:, :, -raw_tail:]
        return out
    return apply


def bits(key_bits: float, value_bits: int, key_group: int = 32, value_group: int = 32,
         outliers: float = 0.01) -> float:
    """Stored bits per KV value: codes, a float16 step and minimum per group, and each exact
    outlier's int32 index and float32 value."""
    scales = 2 * 16
    return (key_bits + scales / key_group + value_bits + scales / value_group
            + 2 * outliers * 64) / 2


def variants(model) -> dict[str, tuple[float, Callable[[torch.Tensor], torch.Tensor]]]:
    """Name -> (bits per value, the prompt-KV transform)."""
    k4v4 = group_quant(4, 4)
    sensitive_key_bits = 4 + 4 * len(SENSITIVE) / model.config.num_hidden_layers
    return {
        "bf16_rounding": (16.0, lambda kv: kv.to(torch.bfloat16).to(kv.dtype)),
        "int8 (shipped)": (bits(8, 8, 64, 64), chunk_by_chunk(shipped("int8"))),
        "int4 (shipped)": (bits(4, 4), chunk_by_chunk(shipped("int4"))),
        "int4 k32/v32 + out1 (float)": (bits(4, 4), chunk_by_chunk(k4v4)),
        "keys int8 / values int4": (bits(8, 4, 64), chunk_by_chunk(group_quant(8, 4, 64))),
        "keys int4 / values int8": (bits(4, 8, 32, 64),
                                    chunk_by_chunk(group_quant(4, 8, value_group=64))),
        "int4, keys pre-RoPE": (bits(4, 4), chunk_by_chunk(pre_rope(model, k4v4))),
        "int4, keys in groups of 16": (bits(4, 4, 16),
                                       chunk_by_chunk(group_quant(4, 4, key_group=16))),
        "int4, keys int8 in 5 sensitive layers": (
            bits(sensitive_key_bits, 4),
            chunk_by_chunk(group_quant(8, 4, layers=SENSITIVE, other_key_bits=4))),
        "int4, last 255 tokens raw": (bits(4, 4),
                                      chunk_by_chunk(shipped("int4"), raw_tail=255)),
    }


def by_layer(layers: int) -> dict[str, tuple[None, Callable[[torch.Tensor], torch.Tensor]]]:
    """Each layer alone with int4 keys, then with int4 values; the rest raw (no bits: not a
    codec)."""
    out = {}
    for layer in range(layers):
        out[f"keys int4, layer {layer}"] = (
            None, chunk_by_chunk(group_quant(4, 16, layers=(layer,), other_key_bits=16)))
    for layer in range(layers):
        def values_only(kv: torch.Tensor, start: int, layer=layer) -> torch.Tensor:
            out = kv.clone()
            out[layer:layer + 1, 1] = quantize(kv[layer:layer + 1, 1], 4, "token", 32, 0.01)
            return out
        out[f"values int4, layer {layer}"] = (None, chunk_by_chunk(values_only))
    return out


def compare(bench, model, prompts: list[list[int]], named: dict, greedy: bool = True,
            new_tokens: int = NEW_TOKENS) -> dict:
    """Each variant's figures against raw KV over ``new_tokens`` (see the module docstring)."""
    batches = [prompts[first:first + BATCH] for first in range(0, len(prompts), BATCH)]
    kvs = [bench.prefill_many(model, [prompt[:-1] for prompt in batch]) for batch in batches]
    lasts = [[prompt[-1] for prompt in batch] for batch in batches]
    wants = [bench.greedy_many(model, kv, last, new_tokens)
             for kv, last in zip(kvs, lasts, strict=True)]
    fed = [[[token, *want[:-1]] for token, want in zip(last, batch_wants, strict=True)]
           for last, batch_wants in zip(lasts, wants, strict=True)]
    raw = [bench.forced_logits(model, kv, tokens) for kv, tokens in zip(kvs, fed, strict=True)]
    report = {}
    for name, (stored_bits, transform) in named.items():
        tokens, divergence, agree = [], [], []
        for index, batch_kv in enumerate(kvs):
            changed = [transform(kv) for kv in batch_kv]
            mine = bench.forced_logits(model, changed, fed[index])
            theirs = raw[index]
            tokens += (mine.argmax(-1) == theirs.argmax(-1)).float().mean(-1).tolist()
            divergence += (theirs.exp() * (theirs - mine)).sum(-1).mean(-1).tolist()
            if greedy:
                rows = bench.greedy_many(model, changed, lasts[index], new_tokens)
                agree += [sum(a == b for a, b in zip(got, want, strict=True)) / new_tokens
                          for got, want in zip(rows, wants[index], strict=True)]
        figures = {"bits": stored_bits, "token_agreement": statistics.mean(tokens),
                   "kl_per_token": statistics.mean(divergence)}
        if greedy:
            figures.update(greedy_agreement=statistics.mean(agree), greedy_agreement_min=min(agree))
        report[name] = figures
        shown = f"{stored_bits:5.1f} bits" if stored_bits else " " * 10
        print(f"{name:40} {shown}  tokens {figures['token_agreement']:.3f}  kl "
              f"{figures['kl_per_token']:.5f}" + (f"  greedy {figures['greedy_agreement']:.3f} "
                                                   f"(least {figures['greedy_agreement_min']:.2f})"
                                                   if greedy else ""),
              file=sys.stderr, flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10, help="prompts of 1024 tokens (10)")
    parser.add_argument("--layers", action="store_true", help="also each layer alone")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    from lmcache_ext.serving.model import load_model  # transformers: only when run
    torch.set_num_threads(1)
    bench = _codecs_bench()
    loaded = load_model()
    ids = bench.corpus_ids(loaded.tokenizer, 0)
    stride = max(1, (len(ids) - PROMPT_TOKENS) // 20)  # the codecs benchmark's 20 windows
    prompts = [ids[index * stride:index * stride + PROMPT_TOKENS] for index in range(args.prompts)]
    result = {"model": loaded.name, "prompts": args.prompts, "prompt_tokens": PROMPT_TOKENS,
              "new_tokens": NEW_TOKENS, "variants": compare(bench, loaded.model, prompts,
                                                            variants(loaded.model))}
    if args.layers:
        result["by_layer"] = compare(bench, loaded.model, prompts,
                                     by_layer(loaded.layout.num_layers), greedy=False)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
