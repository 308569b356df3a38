"""vllm_compat's reading of vLLM's KV caches: vLLM 0.33's FlashInfer backend gets the same packed
``[blocks, kv_heads, block_size, 2 * head_size]`` view as FlashAttention (vLLM's own allocator
makes it here), and we see K and V exactly where FlashInfer's forward splits them."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext.adapters.vllm import compat as vllm_compat
from lmcache_ext.kernels import PagedLayout, UnsupportedLayout, paged_kv_layers
from tests.adapters.vllm.rig import HEAD_DIM, KV_HEADS, LAYER_NAMES, allocate, vllm_config
from tests.adapters.vllm.test_connector import rig_for, save_prompt_a

pytestmark = pytest.mark.skipif(
    vllm_compat.VLLM_VERSION < vllm_compat.PACKED_SINCE,
    reason="vLLM 0.23's FlashInfer cache is the 5-D block_first one (test_vllm_connector's "
           "legacy FLASH_ATTN case); the packed view exists from 0.26")


def flashinfer_split(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [blocks, block_size, heads, head_dim] as vLLM 0.33's FlashInfer forward takes them
    (vllm/v1/attention/backends/flashinfer.py: ``kv_cache.transpose(1, 2).split(self.head_size,
    dim=-1)``; the module itself needs the flashinfer package, absent here)."""
    k, v = cache.transpose(1, 2).split(HEAD_DIM, dim=-1)
    return k, v


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "BLNHC"])
def test_flashinfer_packed_cache_is_read_where_flashinfer_reads_it(tmp_path, layout):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    config = vllm_config(tmp_path, layout, prefix_caching=False)
    config.attention_config.backend = AttentionBackendEnum["FLASHINFER"]
    _, caches = allocate(config, "FLASHINFER")
    backend = vllm_compat.attention_backend(config, LAYER_NAMES)
    assert backend == "FLASHINFER"
    ordered = [caches[name] for name in LAYER_NAMES]
    paged = vllm_compat.paged_layout(ordered[0], KV_HEADS, HEAD_DIM, backend)
    assert paged is PagedLayout.PACKED
    for view, cache in zip(paged_kv_layers(ordered, paged, KV_HEADS, HEAD_DIM), ordered,
                           strict=True):
        for ours, theirs in zip((view.k, view.v), flashinfer_split(cache), strict=True):
            assert (ours.data_ptr(), ours.shape, ours.stride()) == (
                theirs.data_ptr(), theirs.shape, theirs.stride())


def test_a_flashinfer_engine_saves_the_model_kv(tmp_path):
    """Scenario: the connector registered on FlashInfer caches (refused before) stores what the
    forward wrote, in the engine's [layers, 2, tokens, heads, dim] (asserted in save_prompt_a)."""
    rig = rig_for(tmp_path, "LBNHC", "FLASHINFER")
    save_prompt_a(rig, "FLASHINFER")


def test_flashinfer_nvfp4_cache_is_refused():
    """FlashInfer's NVFP4 cache stacks K heads then V heads on dim 1: not the packed split."""
    nvfp4 = torch.zeros(4, 2 * KV_HEADS, 16, HEAD_DIM // 2 + 8, dtype=torch.uint8)
    with pytest.raises(UnsupportedLayout, match="not a layout"):
        vllm_compat.paged_layout(nvfp4, KV_HEADS, HEAD_DIM, "FLASHINFER")
