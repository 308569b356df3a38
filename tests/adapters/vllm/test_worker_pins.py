"""A rank's pins (``worker_pins.RankPins``) over a real engine and CPU tier: what a lookup pins,
a newer lookup replacing the pin, releases by pin id, and closing."""

from __future__ import annotations

import torch

from lmcache_ext.adapters.vllm.channel import LookupRequest
from lmcache_ext.adapters.vllm.worker_pins import RankPins
from lmcache_ext.chunk import KVLayout
from lmcache_ext.config import load_config
from lmcache_ext.engine import CacheEngine

CHUNK = 16
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)
TOKENS = list(range(100, 164))  # 4 chunks


def engine_holding(tokens: int) -> CacheEngine:
    config = load_config(env={}, overrides={"chunk_size": CHUNK, "max_local_cpu_size": 0.01})
    engine = CacheEngine(config, LAYOUT, "m")
    engine.store(TOKENS[:tokens], torch.randn(LAYOUT.shape(tokens)))
    return engine


def pinned_chunks(engine: CacheEngine) -> int:
    return sum(entry.pins for entry in engine.storage.tiers[0]._index.values())


def request(engine: CacheEngine, pin_id: int, first: int = 0) -> LookupRequest:
    return LookupRequest("req", pin_id, engine.hasher.digests(TOKENS, ""), len(TOKENS), first)


def test_a_lookup_pins_the_held_chunks_after_first_and_names_their_tiers():
    engine = engine_holding(48)
    pins = RankPins(engine)
    assert pins.pin(request(engine, 1, first=1)) == ["cpu"] * 3
    assert len(pins) == 1 and pinned_chunks(engine) == 2
    assert pins.tiers("req", 1) == {1: "cpu", 2: "cpu"}


def test_a_newer_lookup_replaces_the_pin_and_an_older_release_keeps_it():
    """Scenario: vLLM looks a request up again (pin 2) before the release of pin 1 arrives:
    the late release must not drop pin 2's chunks."""
    engine = engine_holding(48)
    pins = RankPins(engine)
    pins.pin(request(engine, 1))
    pins.pin(request(engine, 2))
    assert len(pins) == 1 and pinned_chunks(engine) == 3  # pin 1's chunks went with it
    pins.release("req", 1)
    assert pinned_chunks(engine) == 3 and pins.tiers("req", 1) == {}
    pins.release("req", 2)
    assert len(pins) == 0 and pinned_chunks(engine) == 0 and pins.tiers("req", 2) == {}


def test_a_miss_holds_no_pin_and_release_all_drops_every_pin():
    engine = engine_holding(48)
    pins = RankPins(engine)
    assert pins.pin(request(engine, 1, first=3)) == ["cpu"] * 3  # nothing past first: no pin
    assert len(pins) == 0 and pinned_chunks(engine) == 0
    pins.pin(request(engine, 2))
    pins.pin(LookupRequest("other", 3, engine.hasher.digests(TOKENS, ""), len(TOKENS), 0))
    assert len(pins) == 2 and pinned_chunks(engine) == 6
    pins.release_all()
    assert len(pins) == 0 and pinned_chunks(engine) == 0
