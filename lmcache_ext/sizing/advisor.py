"""Sizing advisor: does a model's reusable context fit vLLM's GPU KV cache, or should it be
offloaded to CPU RAM or local NVMe, and how big should each tier be?

The arithmetic, all in bytes (stated so a user can check it by hand):
- KV bytes per token = 2 (K and V) x layers x KV heads x head dim x dtype bytes.
- Weights = parameters x dtype bytes.
- Tensor parallel degree (unless given): the smallest power of two whose GPUs keep the weights
  at or under ``max_weight_share`` of their usable memory, so at least half is left for KV.
- GPU KV capacity = TP x (GPU memory x ``gpu_memory_utilization`` - ``activation_reserve_gib``)
  - weights. This is the pool vLLM's own prefix cache holds without any offloading.
- CPU tier = ``ram_share`` of host RAM; disk tier = ``nvme_share`` of local NVMe. The disk tier is
  inclusive (every chunk is written behind to it), so it holds GPU-evicted context on its own.

Against the seed's "when to use" table for ml.p4de.24xlarge (8 x A100 80 GB, 1152 GiB RAM,
8 TB NVMe), with the defaults below:
- ~1B (Llama 3.2 1B): GPU holds ~2.2M tokens, GPU+CPU ~32M. Seed: < 2M none, 2M-30M CPU. Agrees.
- ~7-10B (Llama 3 8B): GPU ~440K, GPU+CPU ~8M. Seed: < 250K none, 250K-8M CPU. The GPU
  boundary is 1.8x the seed's; the seed's row is the conservative end (it likely reserves more
  for concurrent decode batches). Qwen 2.5-7B has 4 KV heads to Llama 3 8B's 8, so its KV per
  token is 56 KiB against 128 KiB and every boundary sits ~2.3x later (GPU ~1M tokens): the
  seed's note that the two models differ because of their KV heads.
- ~70B+ (Llama 3 70B / Qwen 2.5-72B, tensor parallel 4): GPU ~470K, GPU+CPU ~3.4M. Seed table:
  < 250K none, 250K-3M CPU; the seed's own text says a 72B model "requires offloading around
  500K tokens", which we match; the table's 250K is 1.9x lower. With all 8 GPUs for one 70B
  replica the GPU pool is ~1.4M tokens (pass ``--tp 8`` to see it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcache_ext.sizing.instances import Instance
from lmcache_ext.units import GIB

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2,
               "float8_e4m3fn": 1, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs from a model. ``params_b`` in billions; dtype bytes of weights and KV."""

    name: str
    params_b: float
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * self.dtype_bytes


# From each model's published config.json (bfloat16).
KNOWN_MODELS: dict[str, ModelShape] = {m.name: m for m in (
    ModelShape("llama-3.2-1b", 1.24, 16, 8, 64),
    ModelShape("qwen2.5-1.5b", 1.54, 28, 2, 128),
    ModelShape("llama-3-8b", 8.03, 32, 8, 128),
    ModelShape("qwen2.5-7b", 7.62, 28, 4, 128),
    ModelShape("qwen3-8b", 8.19, 36, 8, 128),
    ModelShape("llama-3-70b", 70.6, 80, 8, 128),
    ModelShape("qwen2.5-72b", 72.7, 80, 8, 128),
)}


def known_model(name: str) -> ModelShape:
    if name.lower() not in KNOWN_MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)} "
                       "(or give --model-config config.json)")
    return KNOWN_MODELS[name.lower()]


def _estimate_params(cfg: dict[str, Any], hidden: int, heads: int, kv_heads: int,
                     head_dim: int) -> float:
    """Parameters of a decoder-only transformer from its config (norms and biases left out)."""
    vocab = int(cfg.get("vocab_size", 32000))
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1)
    inter = int(cfg.get("moe_intermediate_size") if experts > 1 else 0
                or cfg.get("intermediate_size", 4 * hidden))
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o, k, v projections
    mlp = 3 * hidden * inter * experts  # gate, up, down
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    return (int(cfg["num_hidden_layers"]) * (attention + mlp) + embeddings) / 1e9


def model_from_config(config: dict[str, Any], name: str = "config.json") -> ModelShape:
    """A ``ModelShape`` from a Hugging Face ``config.json`` mapping (multimodal: its text part)."""
    cfg = config.get("text_config") or config
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype")
                or "bfloat16")
    return ModelShape(name, _estimate_params(cfg, hidden, heads, kv_heads, head_dim),
                      int(cfg["num_hidden_layers"]), kv_heads, head_dim,
                      DTYPE_BYTES.get(dtype.replace("torch.", ""), 2))


def read_model_config(path: str | Path) -> ModelShape:
    """Read ``config.json`` (or a folder holding it); raises OSError / ValueError / KeyError."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    with open(path, encoding="utf-8") as handle:
        return model_from_config(json.load(handle), name=str(path))


@dataclass(frozen=True)
class Assumptions:
    """The stated knobs of the arithmetic (module docstring)."""

    gpu_memory_utilization: float = 0.9  # vLLM's default
    activation_reserve_gib: float = 3.0  # per GPU: activations, CUDA graphs, NCCL buffers
    max_weight_share: float = 0.5  # of a TP group's usable GPU memory
    ram_share: float = 0.8  # the rest: model server, OS, weight loading
    nvme_share: float = 0.9  # file system overhead and slack


@dataclass(frozen=True)
class Capacity:
    """What each tier can hold for one model replica. Bytes; token counts are cumulative."""

    model: ModelShape
    instance: Instance
    assumptions: Assumptions
    tp: int
    gpu_kv_bytes: float
    cpu_bytes: float
    disk_bytes: float

    @property
    def gpu_tokens(self) -> int:
        return int(max(self.gpu_kv_bytes, 0) // self.model.kv_bytes_per_token)

    @property
    def cpu_tokens(self) -> int:
        """GPU + CPU: the context that fits without touching the disk."""
        return self.gpu_tokens + int(self.cpu_bytes // self.model.kv_bytes_per_token)

    @property
    def disk_tokens(self) -> int:
        """GPU + disk (the disk tier is inclusive of the CPU tier's chunks)."""
        return self.gpu_tokens + int(self.disk_bytes // self.model.kv_bytes_per_token)


def choose_tp(model: ModelShape, instance: Instance, assumptions: Assumptions) -> int:
    usable = _usable_per_gpu(instance, assumptions)
    tp = 1
    while tp < instance.gpus and model.weight_bytes > assumptions.max_weight_share * tp * usable:
        tp *= 2
    return min(tp, instance.gpus)


def _usable_per_gpu(instance: Instance, assumptions: Assumptions) -> float:
    return (instance.gpu_mem_gib * assumptions.gpu_memory_utilization
            - assumptions.activation_reserve_gib) * GIB


def plan_capacity(model: ModelShape, instance: Instance,
                  assumptions: Assumptions | None = None, tp: int | None = None) -> Capacity:
    assumptions = assumptions or Assumptions()
    tp = tp or choose_tp(model, instance, assumptions)
    gpu_kv = tp * _usable_per_gpu(instance, assumptions) - model.weight_bytes
    return Capacity(model, instance, assumptions, tp, gpu_kv,
                    instance.ram_gib * assumptions.ram_share * GIB,
                    instance.nvme_gib * assumptions.nvme_share * GIB)


@dataclass(frozen=True)
class Advice:
    """The recommendation for one context size. Sizes are per worker (LMCache's convention:
    each tensor-parallel worker keeps its own shard, 1/TP of every chunk), in GiB."""

    context_tokens: int
    tier: str  # "none" | "cpu" | "disk" | "beyond"
    max_local_cpu_size: float | None
    max_local_disk_size: float | None
    reason: str


MARGIN = 1.1  # sizes leave 10% over the context's KV bytes: chunk padding, partial chunks


def advise(capacity: Capacity, context_tokens: int) -> Advice:
    kv = capacity.model.kv_bytes_per_token
    need = context_tokens * kv * MARGIN
    per_worker = capacity.tp * GIB
    if context_tokens <= capacity.gpu_tokens:
        return Advice(context_tokens, "none", None, None,
                      f"{fmt_tokens(context_tokens)} tokens fit vLLM's GPU KV pool "
                      f"({fmt_tokens(capacity.gpu_tokens)} tokens)")
    if context_tokens <= capacity.cpu_tokens:
        cpu = min(need, capacity.cpu_bytes)
        return Advice(context_tokens, "cpu", round(cpu / per_worker, 1), None,
                      f"{fmt_tokens(context_tokens)} tokens x {kv} B = {need / GIB:.1f} GiB with "
                      f"10% margin: over the GPU pool, within GPU + CPU "
                      f"({fmt_tokens(capacity.cpu_tokens)} tokens)")
    disk_size = round(min(need, capacity.disk_bytes) / per_worker, 1)
    cpu_size = round(capacity.cpu_bytes / per_worker, 1)
    if context_tokens <= capacity.disk_tokens:
        return Advice(context_tokens, "disk", cpu_size, disk_size,
                      f"{need / GIB:.1f} GiB of KV: over GPU + CPU "
                      f"({fmt_tokens(capacity.cpu_tokens)} tokens), within the NVMe tier "
                      f"({fmt_tokens(capacity.disk_tokens)} tokens); CPU stays the hot tier")
    return Advice(context_tokens, "beyond", cpu_size, disk_size,
                  f"{need / GIB:.1f} GiB of KV is over this instance's NVMe tier "
                  f"({fmt_tokens(capacity.disk_tokens)} tokens): add a shared store "
                  "(remote_url) or more instances with sticky sessions")


def fmt_tokens(n: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(int(n))


def render(capacity: Capacity, advice: Advice | None = None) -> list[str]:
    """The reasoning in numbers, one line each, then the ranges (and the advice, if any)."""
    m, i, a = capacity.model, capacity.instance, capacity.assumptions
    kv = m.kv_bytes_per_token
    lines = [
        f"model {m.name}: 2 (K,V) x {m.layers} layers x {m.kv_heads} KV heads x {m.head_dim} "
        f"head dim x {m.dtype_bytes} B = {kv} B ({kv / 1024:.1f} KiB) of KV per token",
        f"weights: {m.params_b:.2f} B params x {m.dtype_bytes} B = {m.weight_bytes / GIB:.1f} GiB",
        f"instance {i.name}: {i.gpus} x {i.gpu_mem_gib:g} GiB GPU, {i.ram_gib:g} GiB RAM, "
        f"{i.nvme_gib:.0f} GiB NVMe",
        f"tensor parallel {capacity.tp} (weights <= {a.max_weight_share:.0%} of the group's "
        f"usable GPU memory, smallest power of two)",
        f"GPU KV pool: {capacity.tp} x ({i.gpu_mem_gib:g} GiB x {a.gpu_memory_utilization} - "
        f"{a.activation_reserve_gib:g} GiB reserve) - {m.weight_bytes / GIB:.1f} GiB weights = "
        f"{capacity.gpu_kv_bytes / GIB:.1f} GiB = {fmt_tokens(capacity.gpu_tokens)} tokens",
        f"CPU tier: {a.ram_share:.0%} of {i.ram_gib:g} GiB RAM = {capacity.cpu_bytes / GIB:.0f} "
        f"GiB = {fmt_tokens(capacity.cpu_bytes / kv)} tokens",
        f"disk tier: {a.nvme_share:.0%} of {i.nvme_gib:.0f} GiB NVMe = "
        f"{capacity.disk_bytes / GIB:.0f} GiB = {fmt_tokens(capacity.disk_bytes / kv)} tokens",
        "recommendation by reusable context (tokens cached across requests):",
        f"  < {fmt_tokens(capacity.gpu_tokens)}: no offloading needed",
        f"  {fmt_tokens(capacity.gpu_tokens)} - {fmt_tokens(capacity.cpu_tokens)}: CPU offloading",
        f"  {fmt_tokens(capacity.cpu_tokens)} - {fmt_tokens(capacity.disk_tokens)}: "
        "disk (NVMe, use_odirect) offloading",
        f"  > {fmt_tokens(capacity.disk_tokens)}: beyond one instance (remote_url, more "
        "instances)",
    ]
    if capacity.gpu_kv_bytes <= 0:
        lines.insert(5, f"WARNING: the weights do not fit {capacity.tp} GPU(s) with room for KV")
    if advice is not None:
        lines += _render_advice(advice, capacity.tp)
    return lines


def _render_advice(advice: Advice, tp: int) -> list[str]:
    lines = [f"for {fmt_tokens(advice.context_tokens)} tokens: {advice.tier}: {advice.reason}"]
    env = []
    if advice.max_local_cpu_size is not None:
        env.append(f"OPTION_LMCACHE_MAX_LOCAL_CPU_SIZE={advice.max_local_cpu_size}")
    if advice.max_local_disk_size is not None:
        env += ["OPTION_LMCACHE_LOCAL_DISK=file:///tmp/cache/",
                f"OPTION_LMCACHE_MAX_LOCAL_DISK_SIZE={advice.max_local_disk_size}",
                "OPTION_LMCACHE_EXTRA_CONFIG={\"use_odirect\": true}"]
    if env:
        lines.append(f"  set (GiB per worker, {tp} worker(s)):")
        lines += [f"    {line}" for line in env]
    return lines


def as_json(capacity: Capacity, advice: Advice | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": capacity.model.name, "instance": capacity.instance.name, "tp": capacity.tp,
        "kv_bytes_per_token": capacity.model.kv_bytes_per_token,
        "gpu_kv_gib": capacity.gpu_kv_bytes / GIB, "cpu_gib": capacity.cpu_bytes / GIB,
        "disk_gib": capacity.disk_bytes / GIB, "gpu_tokens": capacity.gpu_tokens,
        "cpu_tokens": capacity.cpu_tokens, "disk_tokens": capacity.disk_tokens,
    }
    if advice is not None:
        out["advice"] = {"tier": advice.tier, "context_tokens": advice.context_tokens,
                         "max_local_cpu_size": advice.max_local_cpu_size,
                         "max_local_disk_size": advice.max_local_disk_size,
                         "reason": advice.reason}
    return out


# ---------------------------------------------------------------- SageMaker's PrefixLength

BYTES_PER_TOKEN = 4.0  # English text, about 4 bytes a token; code and other scripts differ
BODY_ENVELOPE_BYTES = 64  # JSON before the prompt's text: '{"messages": [{"role": ...'


@dataclass(frozen=True)
class PrefixAdvice:
    """A PREFIX_AWARE ``PrefixLength`` (bytes of the request body) and how it was reached."""

    prefix_length: int
    key_tokens: int  # the prompt tokens the suggested length covers (estimate)
    reason: str


def suggest_prefix_length(chunk_size: int, shared_prefix_tokens: int,
                          group_prefix_tokens: int | None = None,
                          bytes_per_token: float = BYTES_PER_TOKEN) -> PrefixAdvice:
    """PrefixLength for SageMaker's PREFIX_AWARE routing.

    The rule: the key must reach past what *every* request shares (``shared_prefix_tokens``: a
    system prompt) by one chunk, the unit the cache reuses, so requests whose first chunk after
    it differs (another document, another conversation) spread over the instances while those
    that share it meet where it is cached. Bytes = JSON envelope + (shared + chunk) tokens x
    ``bytes_per_token``, then held to SageMaker's range (1024-65536). ``group_prefix_tokens``
    (what a group of requests shares beyond that: a document) is checked: a key longer than
    shared + group reaches each request's own text, and prefix-aware then scatters a group like
    ``RANDOM`` does. Raises ValueError for a chunk size < 1 or negative token counts.
    """
    from lmcache_ext.routing.policy import PREFIX_LENGTH_RANGE

    if chunk_size < 1 or shared_prefix_tokens < 0 or (group_prefix_tokens or 0) < 0:
        raise ValueError("chunk size >= 1 and token counts >= 0, please")
    low, high = PREFIX_LENGTH_RANGE
    wanted = math.ceil(BODY_ENVELOPE_BYTES + (shared_prefix_tokens + chunk_size) * bytes_per_token)
    length = min(max(wanted, low), high)
    tokens = int((length - BODY_ENVELOPE_BYTES) / bytes_per_token)
    reason = (f"{BODY_ENVELOPE_BYTES} B envelope + ({shared_prefix_tokens} shared + "
              f"{chunk_size} chunk) tokens x {bytes_per_token:g} B = {wanted} B")
    if length != wanted:
        reason += f", held to SageMaker's {low}-{high}"
    if shared_prefix_tokens * bytes_per_token + BODY_ENVELOPE_BYTES >= high:
        reason += ("; WARNING: the shared prefix alone is longer than SageMaker's longest key, "
                   "so every request has the same key (one instance, until the concurrency "
                   "threshold spills)")
    elif group_prefix_tokens is not None and tokens > shared_prefix_tokens + group_prefix_tokens:
        reason += (f"; WARNING: covers ~{tokens} tokens, past the {shared_prefix_tokens} + "
                   f"{group_prefix_tokens} a group shares: each request's own text enters the "
                   f"key and a group scatters as with RANDOM")
    return PrefixAdvice(length, tokens, reason)
