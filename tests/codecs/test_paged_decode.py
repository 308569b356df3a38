"""A quantized chunk decoded straight into paged blocks (``paged_decode``) equals decoding it
and scattering the KV (``KVQuantCodec.decode`` + the per-token ``reference.scatter``) bit for
bit, in every layout and cache dtype, for whole and partial chunks, and writes nothing else;
what it does not cover it declines with nothing written."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext.chunk import ChunkMeta
from lmcache_ext.codecs.paged_decode import decode_into
from lmcache_ext.codecs.quantize import INT4, INT4_V1, INT8, KVQuantCodec
from lmcache_ext.kernels import reference
from tests.kernels.test_block_copy import DIM, HEADS, LAYERS, all_caches, random_slots

CODECS = [INT4, INT8, KVQuantCodec(90, "k8v4", 8, 4, 16, 4, outliers_per_mille=30)]
BLOCK_SIZE = 16


def _bits(caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The caches' raw bits (NaN patterns compare equal as bits, not as floats)."""
    width = {2: torch.int16, 4: torch.int32}[caches[0].element_size()]
    return [c.view(width) for c in caches]


def _chunk(tokens: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn((LAYERS, 2, tokens, HEADS, DIM), generator=generator) * 3
    kv[:, :, 0] *= 40  # an attention-sink-like token: the outliers are taken from it
    return kv.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_equals_decode_then_scatter_in_every_layout(codec: KVQuantCodec, dtype: torch.dtype):
    slots_all = random_slots(BLOCK_SIZE, seed=5)
    tokens = len(slots_all)  # not a multiple of the key group: the keys are padded
    kv = _chunk(tokens, dtype, seed=1)
    meta = ChunkMeta.of(kv)
    payload = codec.encode(kv)
    for lo, hi in ((0, tokens), (3, tokens - 5), (7, 8)):
        slots = slots_all[lo:hi]
        for cache in all_caches(dtype, BLOCK_SIZE, seed=2):
            expected = cache.clone()
            reference.scatter(codec.decode(payload, meta)[:, :, lo:hi], expected.views(), slots)
            assert decode_into(codec, payload, meta, lo, hi, cache.views(), slots), cache.name
            for got, want in zip(_bits(cache.buffers), _bits(expected.buffers), strict=True):
                assert torch.equal(got, want), (cache.name, lo, hi)


def test_a_4_bit_section_with_an_odd_code_count_decodes_its_straddling_row():
    """3 layers x 13 tokens x 2 heads x 8 channels: half the codes end mid-row, so one row
    takes its first codes from low nibbles and the rest from high ones."""
    kv = _chunk(13, torch.float32, seed=3)
    meta = ChunkMeta.of(kv)
    payload = INT4.encode(kv)
    slots = torch.arange(13, dtype=torch.int64) + 2 * BLOCK_SIZE
    cache = all_caches(torch.float32, BLOCK_SIZE, seed=4)[0]
    expected = cache.clone()
    reference.scatter(INT4.decode(payload, meta), expected.views(), slots)
    assert decode_into(INT4, payload, meta, 0, 13, cache.views(), slots)
    assert all(torch.equal(a, b) for a, b in zip(_bits(cache.buffers), _bits(expected.buffers),
                                                strict=True))


def test_declines_what_it_does_not_cover_and_writes_nothing():
    kv = _chunk(20, torch.float32, seed=6)
    meta = ChunkMeta.of(kv)
    slots = torch.arange(20, dtype=torch.int64)
    cache = all_caches(torch.float32, BLOCK_SIZE, seed=7)[0]
    before = [b.clone() for b in cache.buffers]
    # a layout of earlier versions (one bit width, other code order)
    assert not decode_into(INT4_V1, INT4_V1.encode(kv), meta, 0, 20, cache.views(), slots)
    half = all_caches(torch.float16, BLOCK_SIZE, seed=7)[0]  # a dtype it does not convert to
    half_kv = kv.half()
    assert not decode_into(INT4, INT4.encode(half_kv), ChunkMeta.of(half_kv), 0, 20,
                           half.views(), slots)
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
               for a, b in zip(cache.buffers, before, strict=True))


def test_a_slot_past_the_cache_is_refused_before_anything_is_written():
    kv = _chunk(4, torch.float32, seed=8)
    cache = all_caches(torch.float32, BLOCK_SIZE, seed=9)[0]
    before = [b.clone() for b in cache.buffers]
    past = cache.views()[0].num_slots
    with pytest.raises(ValueError, match="past the cache"):
        decode_into(INT8, INT8.encode(kv), ChunkMeta.of(kv), 0, 4, cache.views(),
                    torch.tensor([0, 1, 2, past]))
    with pytest.raises(ValueError, match="slots for tokens"):
        decode_into(INT8, INT8.encode(kv), ChunkMeta.of(kv), 0, 4, cache.views(),
                    torch.tensor([0, 1]))
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
               for a, b in zip(cache.buffers, before, strict=True))
