"""Moves KV between the engine's chunk layout and a transformers ``DynamicCache``.

The engine's layout is ``[layers, 2 (K, V), tokens, kv_heads, head_dim]``; a ``DynamicCache``
layer holds keys and values as ``[batch=1, kv_heads, tokens, head_dim]``. Only batch 1 is used
(the built-in engine serves one sequence at a time).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PretrainedConfig

from lmcache_ext.chunk import KVLayout


def layout_of(config: PretrainedConfig, dtype: torch.dtype) -> KVLayout:
    """The KV layout of a decoder-only transformers model."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return KVLayout(num_layers=text.num_hidden_layers,
                    num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                    head_dim=head_dim, dtype=dtype)


def cache_to_kv(cache: DynamicCache, start: int, end: int) -> torch.Tensor:
    """Tokens [start, end) of ``cache`` as one contiguous ``[layers, 2, tokens, heads, dim]``."""
    planes = []
    for layer in cache.layers:
        keys = layer.keys[0, :, start:end].transpose(0, 1)  # [tokens, heads, dim]
        values = layer.values[0, :, start:end].transpose(0, 1)
        planes.append(torch.stack((keys, values)))
    return torch.stack(planes)


def empty_cache_kv(layout: KVLayout, num_tokens: int, pin_memory: bool = False) -> torch.Tensor:
    """An uninitialised host KV of ``layout.shape(num_tokens)`` whose memory is laid out as a
    ``DynamicCache`` holds it (``[layers, 2, heads, tokens, dim]``): retrieving into it and then
    ``kv_to_cache`` fills the cache with one copy instead of two. ``pin_memory`` (needs CUDA):
    page-locked, for an asynchronous copy to a GPU."""
    storage = torch.empty((layout.num_layers, 2, layout.num_kv_heads, num_tokens,
                           layout.head_dim), dtype=layout.dtype, pin_memory=pin_memory)
    return storage.permute(0, 1, 3, 2, 4)  # a view: [layers, 2, tokens, heads, dim]


def kv_to_cache(kv: torch.Tensor, num_tokens: int, config: PretrainedConfig) -> DynamicCache:
    """A ``DynamicCache`` holding tokens [0, num_tokens) of ``kv``: views, no copy, when ``kv``
    came from ``empty_cache_kv`` and is used whole (else contiguous copies).

    The layers are filled directly: ``DynamicCache(ddp_cache_data=...)`` would concatenate each
    tensor onto an empty one, a copy of every loaded byte on the path to the first token. Later
    tokens are appended by concatenation, which never writes into these tensors.
    """
    cache = DynamicCache(config=config)
    if len(cache.layers) != kv.shape[0]:
        raise ValueError(f"the model has {len(cache.layers)} cache layers, the KV {kv.shape[0]}")
    for index, layer in enumerate(cache.layers):
        keys = kv[index, 0, :num_tokens].transpose(0, 1).unsqueeze(0).contiguous()  # [1, H, T, D]
        values = kv[index, 1, :num_tokens].transpose(0, 1).unsqueeze(0).contiguous()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return cache
