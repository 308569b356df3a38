"""vLLM V1 KV connector: vLLM's prefix KV comes from and goes to lmcache-ext's tiers.

Configure with ``--kv-transfer-config '{"kv_connector": "LMCacheExtConnector",
"kv_connector_module_path": "lmcache_ext.adapters.vllm.connector", "kv_role": "kv_both",
"kv_connector_extra_config": {...engine keys...}}'``, or with LMCache's name
``LMCacheConnectorV1`` (or ``--kv-offloading-backend lmcache``): the package's vLLM plugin
(``plugin``) resolves those to this class. The engine's config is ``load_config``'s
(file + env + defaults), with the offloading size and ``kv_connector_extra_config`` as overrides.

This class is a thin face over two sides that may live in different processes:
- the scheduler side (``scheduler``, in vLLM's engine core): hashes each prompt once, asks
  every rank's cache how much of it they hold, plans loads and saves into the step's metadata;
- the worker side (``worker``, one per tensor-parallel rank, where the KV is): owns the
  rank's ``CacheEngine`` and tiers, answers the scheduler's lookups (``channel``: in
  process when the worker runs in the engine core, else over ZMQ IPC with timeouts), and copies
  KV between the tiers and vLLM's paged blocks.
A hit counts only where every rank holds it; a rank that cannot be reached is a miss, said once
and loudly in the log, never a hang or a wrong answer.
"""

from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
)

from lmcache_ext import kernels
from lmcache_ext.adapters.vllm import compat as vllm_compat
from lmcache_ext.adapters.vllm.channel import AllRanksClient
from lmcache_ext.adapters.vllm.metadata import LMCacheExtMetadata
from lmcache_ext.adapters.vllm.scheduler import SchedulerSide
from lmcache_ext.adapters.vllm.stats import (
    GAUGE_PREFIXES,
    LMCacheExtPromMetrics,
    LMCacheExtStats,
    emf_metrics,
    merge_into,
)
from lmcache_ext.adapters.vllm.takeover import describe_takeover, offloading_overrides
from lmcache_ext.adapters.vllm.worker import WorkerSide
from lmcache_ext.chunk import KVLayout
from lmcache_ext.config import EngineConfig, load_config
from lmcache_ext.cost import CostModel
from lmcache_ext.emf import EmfReporter, on_sagemaker
from lmcache_ext.engine import CacheEngine, key_namespace
from lmcache_ext.keys import PrefixHasher

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


def _show_our_logs() -> None:
    """vLLM configures only its own logger; without this our INFO lines (the effective config,
    the tiers, which ranks the scheduler reaches) would not appear in any of its processes.
    Skipped when the application configured logging itself, or VLLM_CONFIGURE_LOGGING=0."""
    ours = logging.getLogger("lmcache_ext")
    if ours.handlers or logging.getLogger().handlers or \
            os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        "(%(processName)s pid=%(process)d) %(levelname)s %(asctime)s [lmcache-ext] %(message)s",
        "%m-%d %H:%M:%S"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


_show_our_logs()


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


def _emf_reporter(config: Any, model: str) -> EmfReporter | None:
    """The CloudWatch EMF line writer, if ``emf_metrics`` is on (unset: on SageMaker)."""
    enabled = config.emf_metrics if config.emf_metrics is not None else on_sagemaker(os.environ)
    if not enabled:
        return None
    log.info("lmcache-ext: CloudWatch EMF lines every %.0f s, namespace %s, dimension "
             "Model=%s", config.emf_interval_s, config.emf_namespace, model)
    return EmfReporter(config.emf_namespace, {"Model": model[:1024]}, config.emf_interval_s,
                       emf_metrics, merge=merge_into, gauge_prefix=GAUGE_PREFIXES)


def _recompute_failed_loads(vllm_config: VllmConfig) -> None:
    """A load can fail after the lookup counted it (a chunk evicted, its file deleted, its Redis
    key flushed or failing its checksum): that must be a miss. vLLM's default policy fails the
    request instead; its scheduler reads the policy after making this connector, so set it."""
    transfer = vllm_config.kv_transfer_config
    if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
        transfer.kv_load_failure_policy = "recompute"
        log.info("lmcache-ext: kv_load_failure_policy=recompute: a load that fails is "
                 "recomputed, never a failed request")


def model_layout(vllm_config: VllmConfig) -> KVLayout:
    """The KV layout ``_layout_from`` finds in vLLM's KV cache config, read from the model's
    config instead (a process without the engine core's KV cache config: the LMI handler): one
    rank's attention layers, KV heads and head size, and the KV cache's dtype."""
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    dtype = kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, model)
    return KVLayout(num_layers=model.get_num_layers(parallel),
                    num_kv_heads=model.get_num_kv_heads(parallel),
                    head_dim=model.get_head_size(), dtype=dtype)


def scheduler_hasher(config: EngineConfig, layout: KVLayout,
                     vllm_config: VllmConfig) -> PrefixHasher:
    """How the scheduler side names a prompt's chunks: rank 0's namespace (a chain's root holds
    no rank, so one hash serves every rank). The LMI handler's lookups hash with it too."""
    world = vllm_config.parallel_config.tensor_parallel_size
    namespace = key_namespace(config, layout, _model_name(vllm_config), 0, world)
    return PrefixHasher(namespace, config.save_unfull_chunk)


def _model_name(vllm_config: VllmConfig) -> str:
    model = vllm_config.model_config
    revision = getattr(model, "revision", None)
    return f"{model.model}@{revision}" if revision else str(model.model)


class LMCacheExtConnector(KVConnectorBase_V1):
    """lmcache-ext as a vLLM V1 KV connector (best-effort prefix cache; see the module doc)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig):
        vllm_compat.check_version()
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("lmcache-ext's connector does not support pipeline parallelism "
                             "(pipeline_parallel_size > 1); use tensor parallelism")
        self.config = self.effective_config(vllm_config)
        layout = _layout_from(kv_cache_config)
        block_size = vllm_config.cache_config.block_size
        model = _model_name(vllm_config)
        world = vllm_config.parallel_config.tensor_parallel_size
        if role == KVConnectorRole.SCHEDULER and (line := describe_takeover(vllm_config)):
            log.info("%s", line)  # the scheduler side exists once per engine: said once
        engine_key = str(self._kv_transfer_config.engine_id)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self._load_errors: set[int] = set()  # blocks of failed loads, reported once
        self._emf: EmfReporter | None = None
        if role == KVConnectorRole.SCHEDULER:
            caches = AllRanksClient(engine_key, world, self.config.worker_lookup_timeout_s,
                                  self.config.worker_lookup_backoff_s)
            chunk = self.config.chunk_size
            cost = CostModel(chunk, math.prod(layout.shape(chunk)) * layout.dtype.itemsize,
                             self.config.min_retrieve_tokens, self.config.cost_aware_retrieval)
            self.scheduler = SchedulerSide(scheduler_hasher(self.config, layout, vllm_config),
                                           caches, block_size, self.config.save_decode_cache,
                                           cost, self.config.async_load)
            self._emf = _emf_reporter(self.config, model)
            _recompute_failed_loads(vllm_config)
        else:
            rank = vllm_compat.tp_rank(world)
            engine = CacheEngine(self.config, layout, model, rank, world)
            self.worker = WorkerSide(engine, block_size, engine_key, rank)

    @staticmethod
    def effective_config(vllm_config: VllmConfig) -> EngineConfig:
        """The engine config this connector runs with in ``vllm_config``: ``load_config``
        (file + env) with the offloading route's size, then ``kv_connector_extra_config``, as
        overrides. Raises ConfigError naming the bad key."""
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        world = vllm_config.parallel_config.tensor_parallel_size
        overrides = {**offloading_overrides(vllm_config, world), **extra}
        return load_config(env=os.environ, overrides=overrides)

    @property
    def engine(self) -> CacheEngine:
        """The worker side's engine (this rank's tiers)."""
        if self.worker is None:
            raise AttributeError("the scheduler side has no cache engine: the tiers live in "
                                 "the workers")
        return self.worker.engine

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is a future miss, never a failed request

    # -------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens every rank's cache holds beyond ``num_computed_tokens`` and worth loading
        (``cost_aware_retrieval``, ``min_retrieve_tokens``), pinned until loaded, and whether
        they load in the background (``async_load``: the request then waits unscheduled while
        other requests keep running; else the load runs in the step, before its forward)."""
        return self.scheduler.matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        # The block ids matter only to a background load (it is planned now).
        block_ids = list(blocks.get_block_ids()[0]) if num_external_tokens else []
        self.scheduler.allocated(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LMCacheExtMetadata:
        return self.scheduler.build_meta(scheduler_output)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Finished or aborted: drop the request's pin and state. Blocks are freed at once,
        unless a decode save is planned: then vLLM keeps them until ``get_finished`` reports
        the request (the next step)."""
        return self.scheduler.finished(request, block_ids), None

    def update_connector_output(self, connector_output: Any) -> None:
        """The workers' figures of a step (summed over ranks) feed the cost model; blocks they
        could not load are saved again once recomputed."""
        super().update_connector_output(connector_output)
        self.scheduler.load_errors(set(getattr(connector_output, "invalid_block_ids", ())))
        self.scheduler.loads_finished(set(connector_output.finished_recving or ()))
        stats = getattr(connector_output, "kv_connector_stats", None)
        if isinstance(stats, LMCacheExtStats):
            self.scheduler.observe(stats)
            if self._emf is not None:
                self._emf.add(stats.data)

    def num_pinned_requests(self) -> int:
        """Requests holding a pin (operators and tests: a pin that never goes is a leak)."""
        return self.scheduler.num_pinned_requests()

    # -------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register(kv_caches, self._vllm_config)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None:
            self.worker.timer.begin()  # before the forward pass (the prefill speed)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Runs the step's loads in the step and hands its background loads to the loader
        thread. vLLM calls this before the forward pass where a step has loads in the step,
        else after it, just before ``wait_for_save``."""
        ops = getattr(self._get_connector_metadata(), "loads", ())
        in_step = [op for op in ops if not op.background]
        for op in ops:
            if op.background:
                self.worker.loads.load_in_background(op)
        for op in in_step:
            self._load_errors.update(self.worker.loads.load(op))
        if in_step:
            self.worker.timer.begin()  # the forward pass starts after our loads

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv finished every load before the forward

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # saved whole in wait_for_save, after the forward wrote every layer

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            self.worker.timer.end(self._get_connector_metadata().num_scheduled_tokens)
            for op in getattr(self._get_connector_metadata(), "saves", ()):
                self.worker.saves.save(op)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None,
                                                                set[str] | None]:
        """Saves the finished requests' decode chunks, then reports them as finished sending
        so vLLM frees their blocks (their ids are in this step's ``finished_req_ids``: the
        same scheduler output carries the save); reports the background loads done since the
        last step as finished receiving. Called every step, also without a forward (vLLM 0.23
        then skips ``wait_for_save``, so these saves cannot live there)."""
        # The blocks a background load could not fill go out in this same step's
        # get_block_ids_with_load_errors: vLLM marks them for recompute before it schedules
        # the request.
        loaded, failed_blocks = self.worker.loads.take_background_loads()
        self._load_errors.update(failed_blocks)
        ops = getattr(self._get_connector_metadata(), "decode_saves", ()) \
            if self.has_connector_metadata() else ()
        for op in ops:
            self.worker.saves.save(op)  # a failed save is logged and counted; the blocks go back
        return {op.req_id for op in ops} or None, loaded or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -------------------------------------------------------------- figures (both sides)

    def get_kv_connector_stats(self) -> LMCacheExtStats | None:
        """This side's figures since vLLM last asked (every step; on the scheduler side they
        also go into the CloudWatch EMF line, when it is on)."""
        if self.worker is not None:
            return self.worker.take_stats()
        stats = self.scheduler.take_stats()
        if self._emf is not None:
            self._emf.add(stats.data if stats is not None else {})
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> LMCacheExtStats:
        return LMCacheExtStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict,
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> \
            LMCacheExtPromMetrics:
        return LMCacheExtPromMetrics(vllm_config, metric_types, labelnames,
                                     per_engine_labelvalues)

    @property
    def save_failures(self) -> int:
        return self.worker.saves.failures

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.scheduler is not None:
            self.scheduler.close()
        if self._emf is not None:
            self.get_kv_connector_stats()  # what vLLM has not taken yet goes into the line
            self._emf.flush()
