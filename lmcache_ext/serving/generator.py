"""Generation with the cache in the request path: lookup -> load the worthwhile prefix ->
prefill only the rest -> first token -> store the new chunks -> decode.

Prefill always runs in pieces cut at chunk boundaries (multiples of ``chunk_size`` from token 0),
with the cache on or off. A loaded chunk is bit-for-bit the KV that its own piece produced, and
the pieces after it are the same computations in both cases, so greedy output with the cache on
is token-for-token the output with it off. For the same reason a prompt that is wholly cached
still recomputes its last chunk: its last token's logits must come from the same computation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from lmcache_ext.cost import CostModel, RetrievalPlan
from lmcache_ext.engine import CacheEngine
from lmcache_ext.serving.model import LoadedModel
from lmcache_ext.serving.transformers_kv import cache_to_kv, empty_cache_kv, kv_to_cache


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    do_sample: bool = False  # False = greedy, whatever the temperature
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # text added by this token (may be "" while a character is incomplete)
    finish_reason: str | None = None  # "stop", "eos" or "length" on the last event


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # the cache held this many leading tokens
    loaded_tokens: int = 0  # and this many were loaded (the rest recomputed: cheaper)
    stored_tokens: int = 0
    ttft_s: float = 0.0
    generated_tokens: int = 0
    plan: RetrievalPlan | None = None
    text: str = ""
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)


class Generator:
    """Serves one sequence at a time (the lock): a CPU runs one prefill well, not two at once."""

    def __init__(self, loaded: LoadedModel, engine: CacheEngine | None, chunk_size: int,
                 cost: CostModel | None = None):
        self.loaded = loaded
        self.engine = engine
        self.chunk_size = chunk_size
        self.cost = cost
        self._lock = threading.Lock()
        config = loaded.model.generation_config
        eos = config.eos_token_id if config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if loaded.tokenizer.eos_token_id is not None:
            eos_ids.add(loaded.tokenizer.eos_token_id)
        self._eos = frozenset(eos_ids)

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 stats: GenerationStats | None = None) -> Iterator[TokenEvent]:
        """Yield tokens as they are made; ``stats`` (if given) is filled in along the way."""
        stats = stats or GenerationStats()
        stats.prompt_tokens = len(prompt_ids)
        with self._lock, torch.inference_mode():
            cache, logits = self._prefill(prompt_ids, stats)
            yield from self._decode(prompt_ids, cache, logits, params, stats)

    # ------------------------------------------------------------------ prefill

    def _prefill(self, prompt_ids: list[int], stats: GenerationStats) -> tuple[DynamicCache,
                                                                                torch.Tensor]:
        loaded_tokens, cache = self._load_prefix(prompt_ids, stats)
        began = time.perf_counter()
        logits = self._run_pieces(prompt_ids, loaded_tokens, cache)
        if self.cost is not None:
            self.cost.observe_prefill(len(prompt_ids) - loaded_tokens,
                                      time.perf_counter() - began)
        return cache, logits

    def _load_prefix(self, prompt_ids: list[int], stats: GenerationStats) -> tuple[int,
                                                                                   DynamicCache]:
        config = self.loaded.model.config
        if self.engine is None:
            return 0, DynamicCache(config=config)
        # Never the chunk holding the last token: its logits must be computed (module docstring).
        limit = (len(prompt_ids) - 1) // self.chunk_size * self.chunk_size
        tiers = self.engine.locate(prompt_ids[:limit])
        stats.cached_tokens = len(tiers) * self.chunk_size
        plan = self.cost.plan(tiers, self.engine.read_speeds()) if self.cost else \
            RetrievalPlan(stats.cached_tokens, stats.cached_tokens, 0.0, 0.0)
        stats.plan = plan
        if plan.load_tokens == 0:
            return 0, DynamicCache(config=config)
        device = self._device()
        # Pinned on a GPU: one asynchronous host-to-device copy of the whole prefix.
        dest = empty_cache_kv(self.loaded.layout, plan.load_tokens,
                              pin_memory=device.type == "cuda")
        got = self.engine.retrieve(prompt_ids[:plan.load_tokens], dest)
        stats.loaded_tokens = got
        if got == 0:
            return 0, DynamicCache(config=config)
        return got, kv_to_cache(dest.to(device, non_blocking=True), got, config)

    def _device(self) -> torch.device:
        """Where the model runs (the CPU for the built-in server; a GPU in scripts/gpu_check)."""
        return next(self.loaded.model.parameters()).device

    def _run_pieces(self, prompt_ids: list[int], start: int, cache: DynamicCache) -> torch.Tensor:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self._device())
        logits = None
        for begin in range(start, len(prompt_ids), self.chunk_size):
            out = self.loaded.model(input_ids=ids[:, begin:begin + self.chunk_size],
                                    past_key_values=cache, use_cache=True)
            logits = out.logits[0, -1]
        assert logits is not None, "a prompt always leaves at least one token to compute"
        return logits

    def _store(self, prompt_ids: list[int], cache: DynamicCache, stats: GenerationStats) -> None:
        if self.engine is None:
            return
        start = stats.loaded_tokens
        if len(prompt_ids) - start < self.chunk_size and not self.engine.config.save_unfull_chunk:
            return
        kv = cache_to_kv(cache, start, len(prompt_ids)).cpu()  # the tiers hold host memory
        stats.stored_tokens = self.engine.store(prompt_ids, kv, start=start)

    # ------------------------------------------------------------------ decode

    def _decode(self, prompt_ids: list[int], cache: DynamicCache, logits: torch.Tensor,
                params: SamplingParams, stats: GenerationStats) -> Iterator[TokenEvent]:
        sampler = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        text = _TextTracker(self.loaded.tokenizer, params.stop)
        produced: list[int] = []
        room = self.loaded.max_context - len(prompt_ids)
        limit = min(params.max_new_tokens, room)
        while True:
            token = _pick(logits, params, sampler)
            produced.append(token)
            piece, stopped = text.add(produced)
            finish = ("eos" if token in self._eos else "stop" if stopped else
                      "length" if len(produced) >= limit else None)
            if len(produced) == 1:
                stats.ttft_s = time.perf_counter() - stats.started
            stats.generated_tokens = len(produced)
            stats.text, stats.finish_reason = text.text, finish
            yield TokenEvent(token, piece, finish)
            if len(produced) == 1:
                self._store(prompt_ids, cache, stats)  # after the first token, off its path
            if finish:
                return
            out = self.loaded.model(input_ids=torch.tensor([[token]], device=self._device()),
                                    past_key_values=cache, use_cache=True)
            logits = out.logits[0, -1]


def _pick(logits: torch.Tensor, params: SamplingParams, sampler: torch.Generator | None) -> int:
    if not params.do_sample or params.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.float().cpu() / params.temperature  # the sampler is a CPU generator
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(ordered, dim=-1) - ordered < params.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=sampler))


class _TextTracker:
    """Incremental detokenisation with stop strings: emits only text that is final."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""

    def add(self, ids: list[int]) -> tuple[str, bool]:
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return "", False
        for stop in self.stop:
            at = full.find(stop)
            if at >= 0:
                full = full[:at]
                piece, self.text = full[len(self.text):], full
                return piece, True
        piece, self.text = full[len(self.text):], full
        return piece, False
