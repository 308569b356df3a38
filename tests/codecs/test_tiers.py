"""The codec stage in the disk and Redis tiers (real files, a real redis-server): what each codec
stores, that any reader loads any codec it knows, and that the rest is a counted miss."""

from __future__ import annotations

import logging
from contextlib import closing

import pytest
import torch

from lmcache_ext.chunk import FIELDS_SIZE, HEADER_SIZE, ChunkMeta, encode_header
from lmcache_ext.codecs.quantize import INT4, INT8
from lmcache_ext.config import load_config
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage import Chunk, TieredStore, build_tiers
from lmcache_ext.storage.remote import RemoteSettings, RemoteTier
from tests.codecs.tiers import KINDS, NAMESPACE, Place, counter
from tests.helpers import key
from tests.storage.test_remote import LAYOUT, engine_for, kv_for, tokens_for

CODECS = {"int8": INT8, "int4": INT4}


@pytest.fixture(params=KINDS)
def place(request, tmp_path):
    server = request.getfixturevalue("redis_server") if request.param == "remote" else None
    return Place(request.param, tmp_path, server)


def kv(n: int, tokens: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n)
    return torch.randn((2, 2, tokens, 2, 64), generator=generator).to(torch.bfloat16)


def verify_close(got: torch.Tensor, n: int, codec: str) -> None:
    want = kv(n, got.shape[2])
    if codec == "raw":
        assert torch.equal(got, want), f"chunk {n} is not bit-exact"
    else:
        error = (got.float() - want.float()).abs().max().item()
        assert error <= CODECS[codec].max_error(want), f"chunk {n}: error {error}"


@pytest.mark.parametrize("codec", ["raw", "int8", "int4"])
def test_each_codec_round_trips_and_stores_that_many_bytes(place, codec):
    tier = place.tier(codec)
    assert tier.put(key(1), Chunk(kv(1)))
    with tier.get(key(1)) as lease:
        verify_close(lease.chunk.kv, 1, codec)
    stored = place.stored(tier, 1)
    version = int.from_bytes(stored[4:6], "little")
    meta = ChunkMeta.of(kv(1))
    if codec == "raw":
        assert version == 1  # raw stays the format every earlier reader reads
    else:
        assert version == 3 and stored[FIELDS_SIZE] == CODECS[codec].id
        length = HEADER_SIZE + CODECS[codec].encoded_size(meta)
        assert stored[:length] == stored.rstrip(b"\0")[:length] and len(stored) >= length
        assert meta.nbytes / CODECS[codec].encoded_size(meta) >= (1.7 if codec == "int8" else 2.8)


@pytest.mark.parametrize("writer,reader", [("raw", "int4"), ("int4", "raw"), ("int8", "int4")])
def test_a_chunk_written_with_one_codec_loads_in_a_tier_configured_for_another(
        place, writer, reader):
    """Scenario: an endpoint is reconfigured (or a fleet is mid-rollout) and finds chunks its
    peers wrote with another codec: the header names the codec, so they load."""
    assert place.tier(writer).put(key(1), Chunk(kv(1)))
    with place.tier(reader).get(key(1)) as lease:
        verify_close(lease.chunk.kv, 1, writer)


def test_an_unknown_codec_is_a_counted_miss(place):
    """Scenario: a newer writer's codec, checksummed correctly: never guessed at, a miss."""
    metrics = EngineMetrics()
    tier = place.tier("int8", metrics=metrics)
    tier.put(key(1), Chunk(kv(1)))
    payload = torch.zeros(1000, dtype=torch.uint8)
    value = encode_header(key(1), ChunkMeta.of(kv(1)), payload, codec=77) + bytes(1000)
    place.plant(tier, 1, value)
    assert tier.get(key(1)) is None
    assert counter(metrics, place.kind, "corrupt") == 1


def test_an_encoded_payload_of_the_wrong_length_is_a_counted_miss(place):
    metrics = EngineMetrics()
    tier = place.tier("int4", metrics=metrics)
    tier.put(key(1), Chunk(kv(1)))
    payload = INT4.encode(kv(1))[:-2].contiguous()  # checksummed as is: only the length is off
    value = encode_header(key(1), ChunkMeta.of(kv(1)), payload, codec=INT4.id)
    place.plant(tier, 1, value + payload.numpy().tobytes())
    assert tier.get(key(1)) is None
    assert counter(metrics, place.kind, "corrupt") == 1


def test_an_outlier_index_outside_its_section_is_a_counted_miss(place):
    """Scenario: an unkeyed store handed a well-formed, checksummed payload whose exact
    outliers point past the KV: refused when read (a miss), never written anywhere."""
    metrics = EngineMetrics()
    tier = place.tier("int4", metrics=metrics)
    tier.put(key(1), Chunk(kv(1)))
    meta = ChunkMeta.of(kv(1))
    payload = INT4.encode(kv(1))
    index = INT4.sections(payload, meta)[3]  # the keys' outlier indices (int32 bytes)
    index[:4] = torch.tensor([1 << 30], dtype=torch.int32).view(torch.uint8)
    value = encode_header(key(1), meta, payload, codec=INT4.id)
    place.plant(tier, 1, value + payload.numpy().tobytes())
    assert tier.get(key(1)) is None
    assert counter(metrics, place.kind, "corrupt") == 1


def test_a_coded_chunk_is_handed_over_undecoded_and_decodes_on_first_use(place):
    """A loader that decodes straight into its blocks gets the checked payload; one that asks
    for the KV gets it decoded once."""
    tier = place.tier("int8")
    tier.put(key(1), Chunk(kv(1)))
    with tier.get(key(1)) as lease:
        chunk = lease.chunk
        assert chunk.coded is not None and chunk.coded.codec is INT8
        assert chunk.meta == ChunkMeta.of(kv(1))
        assert chunk.kv is chunk.kv  # decoded once
        assert torch.equal(chunk.kv, INT8.decode(chunk.coded.payload, chunk.meta))
        verify_close(chunk.kv, 1, "int8")


@pytest.mark.parametrize("decoded", [True, False])
def test_a_prefix_read_decodes_on_the_reader_threads_unless_asked_not_to(place, decoded):
    """A staged (GPU) load wants KV: the store's reader threads decode each chunk while the
    loader copies the one before. A CPU load decodes straight into vLLM's blocks: the store
    hands the chunks over encoded."""
    tier = place.tier("int4")
    for n in range(4):
        tier.put(key(n), Chunk(kv(n)))
    store = TieredStore([tier], EngineMetrics(), read_threads=2)
    with closing(store.get_prefix([key(n) for n in range(4)], decoded)) as leases:
        for n, lease in enumerate(leases):
            with lease:
                assert lease.chunk.coded is not None
                assert (lease.chunk._kv is not None) == decoded
                verify_close(lease.chunk.kv, n, "int4")
    store.close()


def test_kv_a_codec_cannot_describe_is_stored_raw_and_bit_exact(place):
    """Scenario: KV with an inf (no codec describes it; a huge finite value is an exact outlier)
    or short chunks the codec would make larger: stored raw, which every reader reads exactly."""
    tier = place.tier("int4")
    wide = kv(1).float()
    wide[0, 0, 0, 0, 0] = float("inf")
    short = kv(2, tokens=1)
    for n, value in ((1, wide), (2, short)):
        assert tier.put(key(n), Chunk(value))
        with tier.get(key(n)) as lease:
            assert torch.equal(lease.chunk.kv, value)
        assert int.from_bytes(place.stored(tier, n)[4:6], "little") == 1


def test_the_builder_gives_the_disk_tier_its_configured_codec(tmp_path):
    config = load_config(env={}, overrides={
        "local_disk": str(tmp_path), "max_local_disk_size": 0.01, "local_disk_codec": "int8",
        "local_cpu": False})
    (tier,) = build_tiers(config, EngineMetrics(), NAMESPACE)
    assert tier.put(key(1), Chunk(kv(1)))
    assert Place("disk", tmp_path, None).stored(tier, 1)[FIELDS_SIZE] == INT8.id


def test_remote_serde_cachegen_selects_int4_and_says_it_is_not_lmcaches(redis_server, caplog):
    with caplog.at_level(logging.INFO, logger="lmcache_ext.config"):
        config = load_config(env={}, overrides={"remote_url": redis_server.url,
                                                "remote_serde": "cachegen"})
    notes = [r.getMessage() for r in caplog.records if "cachegen" in r.getMessage()]
    assert len(notes) == 1 and "NOT LMCache's CacheGen bitstream" in notes[0]
    tier = RemoteTier(RemoteSettings.from_config(config, env={}), EngineMetrics().for_tier("r"))
    tier.put(key(1), Chunk(kv(1)))
    assert redis_server.client().get(tier.key_name(key(1)))[FIELDS_SIZE] == INT4.id


def test_engines_with_and_without_a_codec_share_one_redis(redis_server):
    """Scenario: two endpoints on one Redis, one writing raw, one int4 (a rollout): each loads
    the other's prefixes, from Redis (their CPU tiers are cold)."""
    raw_engine = engine_for(redis_server.url)
    int4_engine = engine_for(redis_server.url, remote_serde="int4")
    raw_engine.store(tokens_for(1), kv_for(100, 1))
    int4_engine.store(tokens_for(2), kv_for(100, 2))
    raw_engine.flush()
    int4_engine.flush()
    dest = torch.zeros(LAYOUT.shape(100), dtype=LAYOUT.dtype)
    assert int4_engine.retrieve(tokens_for(1), dest) == 96
    assert torch.equal(dest[:, :, :96], kv_for(100, 1)[:, :, :96])  # raw: bit-exact
    assert raw_engine.retrieve(tokens_for(2), dest) == 96
    want = kv_for(100, 2)[:, :, :96]
    assert (dest[:, :, :96].float() - want.float()).abs().max() <= INT4.max_error(want)
