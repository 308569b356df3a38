"""Real vLLM objects on the CPU for the connector tests: a VllmConfig for a tiny Llama (only its
config.json), a Scheduler that builds our connector through KVConnectorFactory, the worker-side
connector, and KV caches allocated by vLLM's own code (so the layout is vLLM's, not a guess).
tests/adapters/__init__.py sets VLLM_TARGET_DEVICE and fails clearly without vLLM."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from lmcache_ext.adapters.vllm import channel as worker_channel
from lmcache_ext.adapters.vllm import compat as vllm_compat
from lmcache_ext.adapters.vllm import connector as vllm_connector
from tests.helpers import TINY_LLAMA

BLOCK_SIZE, CHUNK = 16, 32
LAYERS, KV_HEADS, HEAD_DIM = (TINY_LLAMA[k] for k in ("num_hidden_layers",
                                                      "num_key_value_heads", "head_dim"))
DTYPE = torch.bfloat16
NUM_BLOCKS = 40
CONNECTOR = "LMCacheExtConnector"
MODULE = "lmcache_ext.adapters.vllm.connector"
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


@dataclass
class Rig:
    """One vLLM 'engine': scheduler, worker-side connector and the KV caches it was given."""

    scheduler: Scheduler
    worker: vllm_connector.LMCacheExtConnector
    kv_caches: dict[str, torch.Tensor]
    last_stats: Any = None  # the worker's stats of the last step (what the model runner sends)
    stats_payloads: list = field(default_factory=list)  # what vLLM's loggers got, step by step

    @property
    def connector(self) -> vllm_connector.LMCacheExtConnector:
        return self.scheduler.connector


def vllm_config(tmp_path: Path, layout: str, prefix_caching: bool, max_batched: int = 512,
                **extra) -> VllmConfig:
    """``max_batched``: vLLM's max_num_batched_tokens (small: a chunked prefill)."""
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    model = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="bfloat16",
                        max_model_len=1024, seed=0)
    cache = CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=prefix_caching)
    if hasattr(cache, "kv_cache_layout"):
        cache.kv_cache_layout = layout  # resolved by the engine core in a real run
    scheduler = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_batched,
                                max_model_len=1024,
                                enable_chunked_prefill=True, is_encoder_decoder=False)
    transfer = KVTransferConfig(
        kv_connector=CONNECTOR, kv_connector_module_path=MODULE, kv_role="kv_both",
        # No cost model unless a test asks for it: a stand-in forward takes no time, so
        # vLLM's measured prefill would beat every load.
        kv_connector_extra_config={"chunk_size": CHUNK, "max_local_cpu_size": 0.01,
                                   "cost_aware_retrieval": False, **extra})
    return VllmConfig(model_config=model, cache_config=cache, scheduler_config=scheduler,
                      kv_transfer_config=transfer, device_config=DeviceConfig("cpu"))


def kv_cache_groups() -> list[KVCacheGroupSpec]:
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=HEAD_DIM,
                             dtype=DTYPE)
    return [KVCacheGroupSpec(list(LAYER_NAMES), spec)]


def allocate(config: VllmConfig, backend: str):
    """vLLM's KVCacheConfig and per-layer caches, through vLLM's own planning/allocation."""
    groups = kv_cache_groups()
    spec = groups[0].kv_cache_spec
    if vllm_compat.VLLM_VERSION >= vllm_compat.PACKED_SINCE:
        from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups
        from vllm.v1.worker.utils import allocate_kv_cache
        memory = NUM_BLOCKS * LAYERS * spec.page_size_bytes
        kv_config = get_kv_cache_config_from_groups(config, groups, memory)
        layout = config.cache_config.get_resolved_kv_cache_layout()
        return kv_config, allocate_kv_cache(kv_config, torch.device("cpu"), layout)
    return _allocate_legacy(config, groups, backend)


def _allocate_legacy(config: VllmConfig, groups, backend_name: str):
    """vLLM < 0.26: one tensor per layer in the attention backend's shape and stride order, as
    its GPU model runner makes it (``_reshape_kv_cache_tensors``)."""
    from vllm.config import set_current_vllm_config
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    spec = groups[0].kv_cache_spec
    kv_config = get_kv_cache_config_from_groups(config, groups,
                                                NUM_BLOCKS * LAYERS * spec.page_size_bytes)
    backend = _legacy_backend(backend_name)
    shape = backend.get_kv_cache_shape(kv_config.num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    with set_current_vllm_config(config):
        try:
            order = tuple(backend.get_kv_cache_stride_order())
        except (AttributeError, NotImplementedError):
            order = tuple(range(len(shape)))
    physical = tuple(shape[i] for i in order)
    inverse = [order.index(i) for i in range(len(order))]
    caches = {}
    for tensor in kv_config.kv_cache_tensors:
        raw = torch.zeros(tensor.size, dtype=torch.int8)
        for name in tensor.shared_by:
            caches[name] = raw.view(DTYPE).view(physical).permute(*inverse)
    return kv_config, caches


def _legacy_backend(name: str):
    if name == "FLASH_ATTN":
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
        return FlashAttentionBackend
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    return CPUAttentionBackend


def make_rig(config: VllmConfig, backend: str, over_ipc: bool = False) -> Rig:
    """``over_ipc``: the scheduler asks the worker's cache over its socket, as it does when the
    worker is another process, instead of calling it in-process."""
    kv_config, caches = allocate(config, backend)
    config.cache_config.num_gpu_blocks = kv_config.num_blocks
    scheduler = Scheduler(vllm_config=config, kv_cache_config=kv_config, log_stats=True,
                          structured_output_manager=StructuredOutputManager(config),
                          block_size=BLOCK_SIZE)
    worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, kv_config)
    worker.register_kv_caches(caches)
    if over_ipc:
        worker_channel.forget_local(config.kv_transfer_config.engine_id)
    rig = Rig(scheduler, worker, caches)
    _OPEN_RIGS.append(rig)
    return rig


_OPEN_RIGS: list[Rig] = []


def close_rigs() -> None:
    """Shut every rig's connectors down (their lookup threads and sockets)."""
    while _OPEN_RIGS:
        rig = _OPEN_RIGS.pop()
        rig.worker.shutdown()
        rig.connector.shutdown()


def make_request(req_id: str, prompt: list[int], max_tokens: int = 1,
                 kv_transfer_params: dict | None = None, **kwargs) -> Request:
    """A request as the engine core makes it, with vLLM's own block hasher (its prefix cache
    needs one; our keys never use it). ``kv_transfer_params`` arrive as vLLM's OpenAI server
    passes them: in the sampling params' ``extra_args``."""
    init_none_hash(sha256)
    extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params else None
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
    return Request(request_id=req_id, prompt_token_ids=list(prompt), sampling_params=params,
                   pooling_params=None,
                   block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256), **kwargs)


def run_worker(rig: Rig, scheduler_output, forward=None) -> tuple[set[int], set[str], set[str]]:
    """What a model runner does with the connector for one step; ``forward`` stands in for the
    model writing this step's KV. Returns the block ids reported as failed loads, the
    requests reported as finished sending (their blocks may now be freed) and those reported
    as finished receiving (background loads done)."""
    rig.worker.bind_connector_metadata(scheduler_output.kv_connector_metadata)
    rig.worker.start_load_kv(None)
    # Background loads run on the loader thread; waiting for them here makes each test's
    # steps deterministic (vLLM itself never waits: it polls get_finished every step).
    rig.worker.worker.loads.jobs.join()
    ran = scheduler_output.total_num_scheduled_tokens > 0
    if forward is not None and ran:
        forward(scheduler_output)
    if ran or vllm_compat.WAIT_FOR_SAVE_WITHOUT_FORWARD:
        rig.worker.wait_for_save()
    sending, recving = rig.worker.get_finished(scheduler_output.finished_req_ids)
    errors = rig.worker.get_block_ids_with_load_errors()
    # Saves land off the step; waiting for them keeps the next lookup (and the figures)
    # deterministic. Without the wait a lookup may miss a save still in flight: a miss.
    rig.worker.worker.saves.jobs.join()
    rig.last_stats = rig.worker.get_kv_connector_stats()
    rig.worker.clear_connector_metadata()
    return errors, set(sending or ()), set(recving or ())


def step(rig: Rig, forward=None, token: int = 7):
    """schedule -> worker -> update_from_output, one token sampled per scheduled request."""
    return complete(rig, rig.scheduler.schedule(), forward, token)


def _sampled(rig: Rig, req_id: str, token: int) -> list[int]:
    """The step's sampled tokens of a request: none in a chunked prefill's partial steps."""
    request = rig.scheduler.requests.get(req_id)
    if request is not None and request.num_computed_tokens < request.num_prompt_tokens:
        return []
    return [token]


def complete(rig: Rig, output, forward=None, token: int = 7):
    """worker -> update_from_output for a step already scheduled (``output``)."""
    errors, sending, recving = run_worker(rig, output, forward)
    req_ids = [r.req_id for r in output.scheduled_new_reqs] + list(
        output.scheduled_cached_reqs.req_ids)
    runner = ModelRunnerOutput(req_ids=req_ids,
                               req_id_to_index={r: i for i, r in enumerate(req_ids)},
                               sampled_token_ids=[_sampled(rig, r, token) for r in req_ids],
                               logprobs=None,
                               prompt_logprobs_dict={}, pooler_output=[])
    if errors or sending or recving or rig.last_stats is not None:  # as vLLM's mixin does
        from vllm.v1.outputs import KVConnectorOutput
        runner.kv_connector_output = KVConnectorOutput(invalid_block_ids=errors,
                                                       finished_sending=sending or None,
                                                       finished_recving=recving or None,
                                                       kv_connector_stats=rig.last_stats)
    for outputs in rig.scheduler.update_from_output(output, runner).values():
        stats = outputs.scheduler_stats
        if stats is not None and stats.kv_connector_stats:
            rig.stats_payloads.append(stats.kv_connector_stats)
    return output, errors
