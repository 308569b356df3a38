"""The group-quantized codecs on their own: sizes, error bounds, the scale layout, unfit KV."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext.chunk import ChunkMeta, encode_header
from lmcache_ext.codecs import CODEC_IDS, CODECS, ChunkStage, CodecUnfit
from lmcache_ext.codecs.quantize import INT4, INT8, INT8_V1, LEGACY, KVQuantCodec
from lmcache_ext.config import CHUNK_CODECS
from tests.helpers import key

QUANTIZED = [INT8, INT4]
PLAIN = [KVQuantCodec(90, "k8v8", 8, 8, 64, 64), KVQuantCodec(91, "k4v4", 4, 4, 32, 32),
         KVQuantCodec(92, "k8v4", 8, 4, 16, 16)]  # no outliers; mixed bits; small groups
ALL = QUANTIZED + PLAIN + list(LEGACY)


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


@pytest.mark.parametrize("codec", ALL, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [256, 100, 17, 1])
def test_a_round_trip_stays_within_the_bound(codec, dtype, tokens):
    kv = kv_of(tokens, dtype)
    error = (round_trip(codec, kv).float() - kv.float()).abs().max().item()
    assert error <= codec.max_error(kv)


@pytest.mark.parametrize("codec", ALL, ids=lambda c: c.name)
@pytest.mark.parametrize("tokens", [1, 5])
def test_odd_code_counts_round_trip(codec, tokens):
    """Scenario: 3 channels, one head: sections with an odd number of 4-bit codes."""
    kv = kv_of(tokens, torch.float32, shape=(1, 2, None, 1, 3))
    error = (round_trip(codec, kv) - kv).abs().max().item()
    assert error <= codec.max_error(kv)


@pytest.mark.parametrize("codec", ALL, ids=lambda c: c.name)
@pytest.mark.parametrize("offset", [1, 2, 3, 5])
def test_a_payload_at_an_unaligned_offset_decodes_the_same(codec, offset):
    """A payload sits after a header in a received buffer: int16/int32/int64 views of its
    sections may be unaligned there; the decode must not depend on it."""
    kv = kv_of(100, torch.float32)
    encoded, meta = codec.encode(kv), ChunkMeta.of(kv)
    buffer = torch.zeros(encoded.numel() + offset, dtype=torch.uint8)
    buffer[offset:] = encoded
    assert torch.equal(codec.decode(buffer[offset:], meta), codec.decode(encoded, meta))


@pytest.mark.parametrize("codec", ALL, ids=lambda c: c.name)
def test_encoding_leaves_the_kv_as_it_was(codec):
    kv = kv_of(64, torch.float32)
    before = kv.clone()
    codec.encode(kv)
    assert torch.equal(kv, before)


@pytest.mark.parametrize("codec,ratio", [(INT8, 1.74), (INT4, 2.8)], ids=["int8", "int4"])
def test_a_full_chunk_is_that_much_smaller_than_bfloat16(codec, ratio):
    meta = ChunkMeta.of(kv_of(256))
    assert meta.nbytes / codec.encoded_size(meta) >= ratio


def test_the_sizes_are_codes_packed_plus_two_float16_per_group_plus_outliers():
    kv = kv_of(256)  # [3, 2, 256, 2, 64]
    meta = ChunkMeta.of(kv)
    half = kv.numel() // 2  # keys, values
    exact = 2 * 8 * -(-half * 10 // 1000)  # 1 %: an int32 index and a float32 value each
    key_groups_int4 = 3 * (256 // 32) * 2 * 64  # one per channel per 32 tokens
    value_groups_int4 = 3 * 256 * 2 * (64 // 32)  # one per 32 channels of each token
    assert INT4.encoded_size(meta) == (kv.numel() // 2 + 4 * (key_groups_int4 + value_groups_int4)
                                       + exact)
    key_groups_int8 = 3 * (256 // 64) * 2 * 64
    value_groups_int8 = 3 * 256 * 2 * (64 // 64)
    assert INT8.encoded_size(meta) == kv.numel() + 4 * (key_groups_int8 + value_groups_int8) + exact
    assert INT8_V1.encoded_size(meta) == kv.numel() + 4 * (key_groups_int8 + value_groups_int8)


@pytest.mark.parametrize("codec", QUANTIZED, ids=lambda c: c.name)
def test_the_largest_values_come_back_exactly_and_spare_their_groups(codec):
    """Scenario: an attention-sink-like token (keys 40x) and a few huge values. The 1 % largest
    magnitudes are stored exactly; every other element's error stays what it is without them."""
    kv = kv_of(256, torch.float32)
    kv[:, 0, 0] *= 40
    kv[0, 1, 10:20, 0, 7] = 300.0
    decoded = round_trip(codec, kv)
    huge = kv.abs() > 10  # ~320 of the sink's 384 values and the 10 values: fewer than 1 %
    assert 300 < int(huge.sum()) < kv.numel() // 200
    assert torch.equal(decoded[huge], kv[huge])
    assert (decoded - kv).abs().max() <= codec.max_error(kv_of(256, torch.float32))


@pytest.mark.parametrize("old", LEGACY, ids=lambda c: c.name)
@pytest.mark.parametrize("configured", ["raw", "int8", "int4"])
def test_a_chunk_an_earlier_version_wrote_still_loads(old, configured):
    """Codec ids 1 and 2 (what int8 / int4 wrote before ids 3 and 4) still decode, whatever the
    reader writes; the config names now select the new layouts."""
    kv = kv_of(100)
    payload = old.encode(kv)
    value = encode_header(key(1), ChunkMeta.of(kv), payload, codec=old.id) + bytes(payload.numpy())
    decoded, _ = ChunkStage(configured).decode(key(1), torch.frombuffer(bytearray(value),
                                                                        dtype=torch.uint8))
    assert (decoded.float() - kv.float()).abs().max() <= old.max_error(kv)
    assert CODEC_IDS[old.id] is old and CODECS[old.name.removesuffix("-v1")].id not in (1, 2)


@pytest.mark.parametrize("codec", PLAIN + list(LEGACY), ids=lambda c: c.name)
def test_a_key_outlier_channel_does_not_spoil_the_other_channels(codec):
    """Scenario: keys have a few channels 50x larger (as real keys do). Per-channel key scales
    keep every other channel's error at its own small size."""
    kv = kv_of(64, torch.float32)
    kv[:, 0, :, :, 5] *= 50
    error = (round_trip(codec, kv) - kv).abs()[:, 0]
    others = torch.cat([error[..., :5], error[..., 6:]], dim=-1)
    assert others.max() <= codec.max_error(kv_of(64, torch.float32)), "keys are not per channel"


@pytest.mark.parametrize("codec", PLAIN + list(LEGACY), ids=lambda c: c.name)
def test_a_value_outlier_token_does_not_spoil_the_other_tokens(codec):
    """Scenario: one token's values are 50x larger. Per-token value scales keep the others'."""
    kv = kv_of(64, torch.float32)
    kv[:, 1, 7] *= 50
    error = (round_trip(codec, kv) - kv).abs()[:, 1]
    others = torch.cat([error[:, :7], error[:, 8:]], dim=1)
    assert others.max() <= codec.max_error(kv_of(64, torch.float32)), "values are not per token"


@pytest.mark.parametrize("codec", ALL, ids=lambda c: c.name)
def test_constant_kv_decodes_exactly(codec):
    kv = torch.full((2, 2, 32, 2, 64), 0.75, dtype=torch.bfloat16)
    assert torch.equal(round_trip(codec, kv), kv)


@pytest.mark.parametrize("codec", ALL, ids=lambda c: c.name)
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1e6])
def test_kv_float16_scales_cannot_describe_is_unfit(codec, bad):
    kv = kv_of(32, torch.float32)
    kv[0, 0, 3, 1, 2] = bad
    if bad == -1e6 and getattr(codec, "outliers_per_mille", 0):  # an outlier, stored exactly
        assert round_trip(codec, kv)[0, 0, 3, 1, 2] == bad
        return
    with pytest.raises(CodecUnfit):
        codec.encode(kv)


def test_a_head_dim_the_value_group_does_not_divide_uses_whole_heads():
    kv = kv_of(40, torch.float32, shape=(2, 2, None, 3, 48))
    assert INT4.plan(ChunkMeta.of(kv)).value_group == 48
    error = (round_trip(INT4, kv) - kv).abs().max().item()
    assert error <= INT4.max_error(kv)
