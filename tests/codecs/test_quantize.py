"""The group-quantized codecs on their own: sizes, error bounds, the scale layout, unfit KV."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext.chunk import ChunkMeta
from lmcache_ext.codecs import CODECS, CodecUnfit
from lmcache_ext.codecs.quantize import INT4, INT8
from lmcache_ext.config import CHUNK_CODECS

QUANTIZED = [INT8, INT4]


def kv_of(tokens: int, dtype=torch.bfloat16, seed: int = 0, shape=(3, 2, None, 2, 64)):
    generator = torch.Generator().manual_seed(seed)
    dims = tuple(tokens if d is None else d for d in shape)
    return torch.randn(dims, generator=generator).to(dtype)


def round_trip(codec, kv):
    encoded = codec.encode(kv)
    meta = ChunkMeta.of(kv)
    assert encoded.dtype == torch.uint8 and encoded.numel() == codec.encoded_size(meta)
    decoded = codec.decode(encoded, meta)
    assert decoded.dtype == kv.dtype and decoded.shape == kv.shape
    return decoded


def test_the_config_names_every_codec_the_registry_has():
    assert set(CHUNK_CODECS) == set(CODECS)


@pytest.mark.parametrize("codec", QUANTIZED, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [256, 100, 17, 1])
def test_a_round_trip_stays_within_the_bound(codec, dtype, tokens):
    kv = kv_of(tokens, dtype)
    error = (round_trip(codec, kv).float() - kv.float()).abs().max().item()
    assert error <= codec.max_error(kv)


@pytest.mark.parametrize("codec,ratio", [(INT8, 1.85), (INT4, 3.1)], ids=["int8", "int4"])
def test_a_full_chunk_is_that_much_smaller_than_bfloat16(codec, ratio):
    meta = ChunkMeta.of(kv_of(256))
    assert meta.nbytes / codec.encoded_size(meta) >= ratio


def test_the_sizes_are_codes_packed_plus_two_float16_per_group():
    kv = kv_of(256)  # [3, 2, 256, 2, 64]
    meta = ChunkMeta.of(kv)
    key_groups_int4 = 3 * (256 // 32) * 2 * 64  # one per channel per 32 tokens
    value_groups_int4 = 3 * 256 * 2 * (64 // 32)  # one per 32 channels of each token
    assert INT4.encoded_size(meta) == kv.numel() // 2 + 4 * (key_groups_int4 + value_groups_int4)
    key_groups_int8 = 3 * (256 // 64) * 2 * 64
    value_groups_int8 = 3 * 256 * 2 * (64 // 64)
    assert INT8.encoded_size(meta) == kv.numel() + 4 * (key_groups_int8 + value_groups_int8)


@pytest.mark.parametrize("codec", QUANTIZED, ids=lambda c: c.name)
def test_a_key_outlier_channel_does_not_spoil_the_other_channels(codec):
    """Scenario: keys have a few channels 50x larger (as real keys do). Per-channel key scales
    keep every other channel's error at its own small size."""
    kv = kv_of(64, torch.float32)
    kv[:, 0, :, :, 5] *= 50
    error = (round_trip(codec, kv) - kv).abs()[:, 0]
    others = torch.cat([error[..., :5], error[..., 6:]], dim=-1)
    assert others.max() <= codec.max_error(kv_of(64, torch.float32)), "keys are not per channel"


@pytest.mark.parametrize("codec", QUANTIZED, ids=lambda c: c.name)
def test_a_value_outlier_token_does_not_spoil_the_other_tokens(codec):
    """Scenario: one token's values are 50x larger. Per-token value scales keep the others'."""
    kv = kv_of(64, torch.float32)
    kv[:, 1, 7] *= 50
    error = (round_trip(codec, kv) - kv).abs()[:, 1]
    others = torch.cat([error[:, :7], error[:, 8:]], dim=1)
    assert others.max() <= codec.max_error(kv_of(64, torch.float32)), "values are not per token"


@pytest.mark.parametrize("codec", QUANTIZED, ids=lambda c: c.name)
def test_constant_kv_decodes_exactly(codec):
    kv = torch.full((2, 2, 32, 2, 64), 0.75, dtype=torch.bfloat16)
    assert torch.equal(round_trip(codec, kv), kv)


@pytest.mark.parametrize("codec", QUANTIZED, ids=lambda c: c.name)
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1e6])
def test_kv_float16_scales_cannot_describe_is_unfit(codec, bad):
    kv = kv_of(32, torch.float32)
    kv[0, 0, 3, 1, 2] = bad
    with pytest.raises(CodecUnfit):
        codec.encode(kv)


def test_a_head_dim_the_value_group_does_not_divide_uses_whole_heads():
    kv = kv_of(40, torch.float32, shape=(2, 2, None, 3, 48))
    assert INT4.plan(ChunkMeta.of(kv)).value_group == 48
    error = (round_trip(INT4, kv) - kv).abs().max().item()
    assert error <= INT4.max_error(kv)
