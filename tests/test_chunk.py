"""The stored unit: header + payload round-trips; every kind of damage is caught."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext.chunk import (
    HEADER_SIZE,
    ChunkAuth,
    ChunkCorrupt,
    ChunkForged,
    ChunkMeta,
    as_kv,
    decode,
    encode_header,
    payload_view,
)
from lmcache_ext.keys import ChunkKey

KEY = ChunkKey("0123456789abcdef", bytes(range(32)))


SECRET_A = b"a" * 32
SECRET_B = b"b" * 32


def encoded(kv: torch.Tensor, key: ChunkKey = KEY, auth: ChunkAuth | None = None) -> torch.Tensor:
    payload = payload_view(kv)
    header = torch.frombuffer(bytearray(encode_header(key, ChunkMeta.of(kv), payload, auth)),
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


# ---------------------------------------------------------------------------- keyed (version 2)


def test_a_keyed_chunk_round_trips_with_its_key_and_carries_version_2():
    kv = torch.randn(2, 2, 16, 2, 8, dtype=torch.bfloat16)
    data = encoded(kv, auth=ChunkAuth(SECRET_A))
    assert int.from_bytes(data[4:6].numpy().tobytes(), "little") == 2
    meta, payload = decode(KEY, data, ChunkAuth(SECRET_A))
    assert torch.equal(as_kv(meta, payload), kv)


@pytest.mark.parametrize("forgery", [
    "unkeyed value",  # a writer without the key makes a valid version 1 value
    "another key's tag",  # a tenant (or attacker) with a key of their own
    "payload altered",
    "header altered",
])
def test_a_keyed_reader_calls_every_forgery_forged(forgery):
    kv = torch.randn(2, 2, 16, 2, 8, dtype=torch.bfloat16)
    data = {"unkeyed value": lambda: encoded(kv),
            "another key's tag": lambda: encoded(kv, auth=ChunkAuth(SECRET_B)),
            "payload altered": lambda: flip(encoded(kv, auth=ChunkAuth(SECRET_A)), HEADER_SIZE),
            "header altered": lambda: flip(encoded(kv, auth=ChunkAuth(SECRET_A)), 30),
            }[forgery]()
    with pytest.raises(ChunkForged):
        decode(KEY, data, ChunkAuth(SECRET_A))


def test_an_authentic_value_replayed_under_another_key_is_forged():
    kv = torch.randn(1, 2, 16, 1, 8, dtype=torch.float16)
    for other in (ChunkKey(KEY.namespace, bytes(32)), ChunkKey("fedcba9876543210", KEY.digest)):
        with pytest.raises(ChunkForged, match="another key"):
            decode(other, encoded(kv, auth=ChunkAuth(SECRET_A)), ChunkAuth(SECRET_A))


@pytest.mark.parametrize("cut", [HEADER_SIZE - 1, HEADER_SIZE, -1])
def test_a_truncated_keyed_value_is_corrupt(cut):
    kv = torch.randn(1, 2, 16, 1, 8, dtype=torch.float16)
    with pytest.raises(ChunkCorrupt):
        decode(KEY, encoded(kv, auth=ChunkAuth(SECRET_A))[:cut], ChunkAuth(SECRET_A))


def test_a_reader_without_a_key_refuses_a_keyed_value():
    # Scenario: an endpoint not yet given the key (or older than version 2) shares the store.
    kv = torch.randn(1, 2, 16, 1, 8, dtype=torch.float16)
    with pytest.raises(ChunkCorrupt, match="keyed"):
        decode(KEY, encoded(kv, auth=ChunkAuth(SECRET_A)))


def test_during_a_rotation_both_keys_verify_and_only_the_new_one_signs():
    kv = torch.randn(1, 2, 16, 1, 8, dtype=torch.float16)
    rotating = ChunkAuth(SECRET_B, previous=SECRET_A)
    assert decode(KEY, encoded(kv, auth=ChunkAuth(SECRET_A)), rotating)[0].num_tokens == 16
    signed = encoded(kv, auth=rotating)
    decode(KEY, signed, ChunkAuth(SECRET_B))
    with pytest.raises(ChunkForged):
        decode(KEY, signed, ChunkAuth(SECRET_A))


def test_a_short_secret_is_refused_and_no_secret_is_shown():
    with pytest.raises(ValueError, match="at least 32"):
        ChunkAuth(b"short")
    assert "a" * 32 not in repr(ChunkAuth(SECRET_A))
