"""Shared test helpers: small integers become keys, chunks and prompts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lmcache_ext.keys import ChunkKey
from lmcache_ext.storage import Chunk

REPO = Path(__file__).resolve().parents[1]
# The seed's two lmcache_config.yaml files, exactly as given: the container's example configs.
SEED_CPU = REPO / "container" / "lmcache_config_cpu.yaml"
SEED_NVME = REPO / "container" / "lmcache_config_nvme.yaml"
SHAPE = (2, 2, 16, 2, 8)  # [layers, 2, tokens, kv_heads, head_dim]
CHUNK_BYTES = 2 * 2 * 16 * 2 * 8 * 2  # float16
# A Hugging Face config.json shaped like Llama 3 8B (131072 B of KV per token in bfloat16).
LLAMA_LIKE = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "hidden_size": 4096, "intermediate_size": 14336, "vocab_size": 128256,
              "torch_dtype": "bfloat16"}

# A tiny Llama that vLLM's config code accepts (only its config.json is ever read).
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 1000,
    "max_position_embeddings": 2048, "torch_dtype": "bfloat16",
}


def key(n: int, namespace: str = "test000000000000") -> ChunkKey:
    return ChunkKey(namespace, hashlib.sha256(n.to_bytes(8, "little")).digest())


def chunk(n: int) -> Chunk:
    """A chunk whose values encode ``n``, so a wrong chunk is told apart from the right one."""
    generator = torch.Generator().manual_seed(n)
    return Chunk(torch.randn(SHAPE, generator=generator).to(torch.float16))


def verify_chunk(got: Chunk, n: int) -> None:
    assert torch.equal(got.kv, chunk(n).kv), f"chunk {n} holds the wrong bytes"
