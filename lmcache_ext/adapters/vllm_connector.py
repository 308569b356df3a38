"""vLLM V1 KV connector: vLLM's prefix KV comes from and goes to lmcache-ext's ``CacheEngine``.

Configure with ``--kv-transfer-config '{"kv_connector": "LMCacheExtConnector",
"kv_connector_module_path": "lmcache_ext.adapters.vllm_connector", "kv_role": "kv_both",
"kv_connector_extra_config": {...engine keys...}}'``. The engine's config is ``load_config``'s
(file + env + defaults), with ``kv_connector_extra_config`` as overrides.

Scheduler side (plain bookkeeping, no tensors): the matched-token count is the engine's
chunk-aligned hit beyond vLLM's own computed tokens (one token short on a full hit, so the last
prompt token is recomputed); a load pins its chunks until the request finishes, is aborted or
preempted; a prompt's new whole chunks are saved once, in the step that finishes its prefill.
With ``save_decode_cache``, a finished request's whole chunks of prompt + output whose KV was
computed are saved too: ``request_finished`` keeps its blocks (delay_free_blocks=True), the next
step's metadata carries the save, and the worker saves it in ``get_finished`` (called every step,
with or without a forward, in both vLLM versions) and reports it there as finished sending, so
vLLM frees the blocks only after the copy.
Worker side (synchronous, in the step): ``start_load_kv`` retrieves and scatters into the
request's blocks, only positions vLLM asked for (never slots it already owns); a short or failed
load is reported by ``get_block_ids_with_load_errors`` so vLLM recomputes those blocks.
``wait_for_save`` gathers and stores; a save that fails is logged and counted, never raised.

Scheduler and worker share one engine per process (vLLM's single-GPU executor runs both in the
EngineCore process). With tensor parallelism the workers are other processes, so the scheduler's
lookups see only the tiers they share (disk, remote); a hit a worker cannot load is a load error
and is recomputed, never wrong KV.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmcache_ext import kernels
from lmcache_ext.adapters import vllm_compat
from lmcache_ext.chunk import KVLayout
from lmcache_ext.config import EngineConfig, load_config
from lmcache_ext.engine import CacheEngine

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferOp:
    """One request's load or save for the worker: positions [start, end) of ``token_ids``
    (the prompt, cut to what matters) in ``block_ids``, under the key salt ``salt``."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    end: int
    salt: str


@dataclass
class LMCacheExtMetadata(KVConnectorMetadata):
    """Scheduler -> worker, one per step."""

    loads: list[TransferOp] = field(default_factory=list)
    saves: list[TransferOp] = field(default_factory=list)
    # Saves of finished requests whose blocks vLLM holds until get_finished reports them.
    finishing: list[TransferOp] = field(default_factory=list)


@dataclass
class _RequestState:
    """Scheduler-side bookkeeping of one request."""

    prompt: list[int]
    salt: str
    cacheable: bool
    block_ids: list[int] = field(default_factory=list)
    num_external: int = 0  # tokens to load, set at allocation, consumed by the next metadata
    pin: Any = None  # engine PrefixPin while a load needs the chunks
    saved: bool = False


# ------------------------------------------------------------------ engines (one per process)

_ENGINES: dict[tuple, CacheEngine] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(config: EngineConfig, layout: KVLayout, model: str, rank: int,
                  world: int) -> CacheEngine:
    """The process's engine for this namespace (scheduler and worker roles share it)."""
    key = (repr(config), layout, model, rank, world)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = CacheEngine(config, layout, model, rank, world)
        return _ENGINES[key]


def request_salt(request: Request) -> str:
    """What makes this request's KV differ for the same tokens: LoRA adapter and cache salt."""
    lora = getattr(request, "lora_request", None)
    parts = [f"lora={lora.lora_name}" if lora is not None else "",
             f"salt={request.cache_salt}" if getattr(request, "cache_salt", None) else ""]
    return ";".join(p for p in parts if p)


def _layout_from(kv_cache_config: KVCacheConfig) -> KVLayout:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"lmcache-ext supports one KV cache group (full attention), got "
                         f"{len(groups)} (hybrid / sliding-window models are not supported)")
    spec = groups[0].kv_cache_spec
    if getattr(spec, "head_size_v", spec.head_size) != spec.head_size or \
            type(spec).__name__ != "FullAttentionSpec":
        raise kernels.UnsupportedLayout(f"lmcache-ext supports full attention with K and V of "
                                        f"one head size, got {type(spec).__name__}")
    return KVLayout(num_layers=len(groups[0].layer_names), num_kv_heads=spec.num_kv_heads,
                    head_dim=spec.head_size, dtype=spec.dtype)


def _model_name(vllm_config: VllmConfig) -> str:
    model = vllm_config.model_config
    revision = getattr(model, "revision", None)
    return f"{model.model}@{revision}" if revision else str(model.model)


# ------------------------------------------------------------------ the connector


class LMCacheExtConnector(KVConnectorBase_V1):
    """lmcache-ext as a vLLM V1 KV connector (best-effort prefix cache; see the module doc)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        vllm_compat.check_version()
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self.config = load_config(env=os.environ, overrides=extra)
        self.layout = _layout_from(kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        self._model = _model_name(vllm_config)
        self._world = vllm_config.parallel_config.tensor_parallel_size
        self._rank = 0 if role == KVConnectorRole.SCHEDULER else vllm_compat.tp_rank(self._world)
        self._requests: dict[str, _RequestState] = {}
        self._finishing: list[TransferOp] = []  # for the next metadata (scheduler side)
        self._views: list[kernels.PagedKV] = []
        self._load_errors: set[int] = set()
        self.save_failures = 0  # saves that raised: logged, counted, never passed on
        self.engine = shared_engine(self.config, self.layout, self._model, self._rank,
                                    self._world)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is a future miss, never a failed request

    # -------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens the engine holds beyond ``num_computed_tokens``; reads only (no pins)."""
        prompt = request.prompt_token_ids
        if not prompt or request.mm_features:
            return 0, False  # multimodal items are not in our keys: never cached
        hit = self.engine.lookup(prompt, salt=request_salt(request))
        hit = min(hit, len(prompt) - 1)  # vLLM must compute at least the last prompt token
        return max(hit - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None:
            prompt = list(request.prompt_token_ids or ())
            state = self._requests[request.request_id] = _RequestState(
                prompt, request_salt(request), bool(prompt) and not request.mm_features)
        state.num_external = num_external_tokens
        self._release(state)  # a pin of an earlier allocation (before a preemption) is stale
        if num_external_tokens > 0:
            # Held until the request ends or is preempted, so the chunks cannot be evicted
            # between this decision and the worker's load.
            state.pin = self.engine.pin(state.prompt, salt=state.salt)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LMCacheExtMetadata:
        meta = LMCacheExtMetadata(finishing=self._finishing)
        self._finishing = []
        cached = scheduler_output.scheduled_cached_reqs
        # A request preempted and resumed in the same step was re-planned at its allocation.
        scheduled = {r.req_id for r in scheduler_output.scheduled_new_reqs} | set(cached.req_ids)
        for req_id in vllm_compat.preempted_req_ids(scheduler_output) - scheduled:
            self._on_preempted(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            self._plan(meta, new.req_id, list(new.block_ids[0]), True,
                       new.num_computed_tokens, scheduler_output)
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            self._plan(meta, req_id, list(new_ids[0]) if new_ids else [],
                       req_id in cached.resumed_req_ids, cached.num_computed_tokens[i],
                       scheduler_output)
        return meta

    def _plan(self, meta: LMCacheExtMetadata, req_id: str, block_ids: list[int],
              replace_blocks: bool, num_computed: int, scheduler_output: SchedulerOutput) -> None:
        state = self._requests.get(req_id)
        if state is None:
            return
        state.block_ids = block_ids if replace_blocks else state.block_ids + block_ids
        if state.num_external > 0:
            # num_computed counts vLLM's own hit plus ours: we load the tail of it. The tokens
            # run to the end of the chunk holding the last loaded one (a full hit stops one
            # token short of it, and a chunk is only found by all of its tokens).
            chunk = self.config.chunk_size
            meta.loads.append(TransferOp(req_id, state.prompt[:-(-num_computed // chunk) * chunk],
                                         list(state.block_ids),
                                         num_computed - state.num_external, num_computed,
                                         state.salt))
            state.num_external = 0
        done = num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
        if state.cacheable and not state.saved and done >= len(state.prompt):
            state.saved = True  # once per request: its prompt's KV is complete after this step
            end = self._savable_tokens(len(state.prompt))
            if end > 0:
                meta.saves.append(TransferOp(req_id, state.prompt[:end], list(state.block_ids),
                                             0, end, state.salt))

    def _savable_tokens(self, num_prompt: int) -> int:
        if self.config.save_unfull_chunk:
            return num_prompt
        return num_prompt - num_prompt % self.config.chunk_size

    def _on_preempted(self, req_id: str) -> None:
        state = self._requests.get(req_id)
        if state is not None:
            self._release(state)
            state.block_ids, state.num_external = [], 0

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Finished or aborted: drop the request's pin and state. Blocks are freed at once,
        unless a decode save is planned: then vLLM keeps them until ``get_finished`` reports
        the request (the next step)."""
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False, None
        self._release(state)
        op = self._decode_save(request, state, block_ids) if self.config.save_decode_cache \
            else None
        if op is None:
            return False, None
        self._finishing.append(op)
        return True, None

    def _decode_save(self, request: Request, state: _RequestState,
                     block_ids: list[int]) -> TransferOp | None:
        """The save of the request's whole chunks past its prompt, or None if there are none.
        Only positions whose KV was computed: every one before the last known token (the last
        sampled token has no KV yet; a step still in flight computes only later positions)."""
        if not state.cacheable:
            return None
        tokens = list(request.all_token_ids)
        computed = min(request.num_computed_tokens, len(tokens) - 1)
        end = computed - computed % self.config.chunk_size
        if end <= len(state.prompt) or len(block_ids) * self.block_size < end:
            return None  # no chunk holds output tokens (the prompt's are saved after prefill)
        return TransferOp(request.request_id, tokens[:end], list(block_ids), 0, end,
                          state.salt)

    @staticmethod
    def _release(state: _RequestState) -> None:
        if state.pin is not None:
            state.pin.release()
            state.pin = None

    def num_pinned_requests(self) -> int:
        """Requests holding a pin (operators and tests: a pin that never goes is a leak)."""
        return sum(1 for s in self._requests.values() if s.pin is not None)

    # -------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=vllm_compat.layer_index)
        heads, dim = self.layout.num_kv_heads, self.layout.head_dim
        caches = [kv_caches[n] for n in names]
        backend = vllm_compat.attention_backend(self._vllm_config, names)
        layout = vllm_compat.paged_layout(caches[0], heads, dim, backend)
        self._views = kernels.paged_kv_layers(caches, layout, heads, dim)
        found = KVLayout(len(caches), heads, dim, self._views[0].k.dtype)
        if found != self.layout:
            raise kernels.UnsupportedLayout(f"vLLM's KV caches are {found}, its KV cache "
                                            f"config says {self.layout}")
        log.info("lmcache-ext: %d KV cache layers, backend %s, %s layout, block size %d",
                 len(caches), backend, layout.value, self._views[0].block_size)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        for op in getattr(meta, "loads", ()):
            self._load(op)

    def _load(self, op: TransferOp) -> None:
        engine = self.engine
        chunk = engine.config.chunk_size
        aligned = min(-(-op.end // chunk) * chunk, len(op.token_ids))
        loaded = 0
        try:
            buf = torch.empty(self.layout.shape(aligned), dtype=self.layout.dtype)
            loaded = min(engine.retrieve(op.token_ids[:aligned], buf, salt=op.salt), op.end)
            if loaded > op.start:
                device = self._views[0].k.device
                slots = self._slots(op.block_ids, op.start, loaded, aligned)
                kernels.scatter(buf.to(device), self._views, slots.to(device))
        except Exception:
            log.exception("lmcache-ext: load of request %s failed; it will be recomputed",
                          op.req_id)
            loaded = op.start
        if loaded < op.end:
            first, last = max(loaded, op.start) // self.block_size, (op.end - 1) // self.block_size
            self._load_errors.update(op.block_ids[first:last + 1])

    def _slots(self, block_ids: list[int], start: int, end: int, length: int) -> torch.Tensor:
        """Slot of each position in [0, length): its block's slot for [start, end), else -1."""
        positions = torch.arange(length)
        blocks = torch.tensor(block_ids, dtype=torch.int64)
        within = (positions >= start) & (positions < end)
        index = torch.where(within, positions // self.block_size, 0)
        slots = blocks[index] * self.block_size + positions % self.block_size
        return torch.where(within, slots, -1)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv finished every load before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # saved whole in wait_for_save, after the forward wrote every layer

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            self._save_all(getattr(self._get_connector_metadata(), "saves", ()))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, None]:
        """Saves the finished requests' decode chunks, then reports them as finished sending
        so vLLM frees their blocks. Their ids are in this step's ``finished_req_ids`` (the
        same scheduler output carries the save). Called every step, also without a forward
        (vLLM 0.23 then skips ``wait_for_save``, so these saves cannot live there)."""
        if not self.has_connector_metadata():
            return None, None
        ops = getattr(self._get_connector_metadata(), "finishing", ())
        self._save_all(ops)  # a failed save is logged and counted; the blocks go back anyway
        return {op.req_id for op in ops} or None, None

    def _save_all(self, ops) -> None:
        for op in ops:
            try:
                self._save(op)
            except Exception:
                self.save_failures += 1
                log.exception("lmcache-ext: save of request %s failed (skipped)", op.req_id)

    def _save(self, op: TransferOp) -> None:
        spans = self.engine.spans(op.token_ids, op.salt)
        present = self.engine.storage.prefix_length([s.key for s in spans])
        start = spans[present - 1].end if present else 0
        if start >= op.end:
            return  # the engine has every chunk already: copy nothing
        # Gather only [start, end) and store it as such: a chunk before ``start`` that is
        # evicted meanwhile is then skipped, never stored from memory nobody wrote.
        device = self._views[0].k.device
        buf = torch.empty(self.layout.shape(op.end - start), dtype=self.layout.dtype,
                          device=device)
        slots = self._slots(op.block_ids, start, op.end, op.end)[start:]
        kernels.gather(self._views, slots.to(device), buf)
        self.engine.store(op.token_ids, buf.cpu(), start=start, salt=op.salt)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors
