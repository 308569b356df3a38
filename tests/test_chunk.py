"""The stored unit: header + payload round-trips; every kind of damage is caught."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext.chunk import (
    HEADER_SIZE,
    ChunkCorrupt,
    ChunkMeta,
    as_kv,
    decode,
    encode_header,
    payload_view,
)
from lmcache_ext.keys import ChunkKey

KEY = ChunkKey("0123456789abcdef", bytes(range(32)))


def encoded(kv: torch.Tensor, key: ChunkKey = KEY) -> torch.Tensor:
    payload = payload_view(kv)
    header = torch.frombuffer(bytearray(encode_header(key, ChunkMeta.of(kv), payload)),
                              dtype=torch.uint8)
    return torch.cat([header, payload])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_bit_exact(dtype):
    kv = torch.randn(3, 2, 16, 2, 8).to(dtype)
    meta, payload = decode(KEY, encoded(kv))
    assert meta == ChunkMeta(dtype, (3, 2, 16, 2, 8), 16)
    assert torch.equal(as_kv(meta, payload).view(torch.uint8), kv.view(torch.uint8))


def test_padding_after_the_payload_is_ignored():
    kv = torch.randn(1, 2, 16, 1, 8, dtype=torch.float16)
    data = torch.cat([encoded(kv), torch.zeros(4096, dtype=torch.uint8)])
    assert decode(KEY, data)[0].num_tokens == 16


def flip(data: torch.Tensor, index: int) -> torch.Tensor:
    damaged = data.clone()
    damaged[index] ^= 0xFF
    return damaged


@pytest.mark.parametrize("damage", [
    lambda d: d[:HEADER_SIZE - 1],  # shorter than a header
    lambda d: d[:-1],  # truncated payload
    lambda d: flip(d, 0),  # magic
    lambda d: flip(d, 4),  # version
    lambda d: flip(d, 6),  # dtype code
    lambda d: flip(d, 8),  # shape
    lambda d: flip(d, HEADER_SIZE + 5),  # payload
    lambda d: flip(d, d.numel() - 1),  # last payload byte
    lambda d: torch.zeros_like(d),
])
def test_damage_is_caught(damage):
    kv = torch.randn(2, 2, 16, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ChunkCorrupt):
        decode(KEY, damage(encoded(kv)))


def test_a_chunk_stored_under_another_key_is_caught():
    kv = torch.randn(1, 2, 16, 1, 8, dtype=torch.float16)
    other = ChunkKey(KEY.namespace, bytes(32))
    with pytest.raises(ChunkCorrupt, match="another key"):
        decode(other, encoded(kv))
