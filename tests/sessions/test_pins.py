"""Session pins over a real CacheEngine with a small CPU tier: a session's conversation survives
traffic that evicts everything else, budgets unpin the least recently used session, and nothing
fails for lack of room."""

from __future__ import annotations

import threading

import torch

from lmcache_ext.chunk import KVLayout
from lmcache_ext.config import load_config
from lmcache_ext.engine import CacheEngine
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.sessions.pins import PinBudget, SessionPins
from lmcache_ext.storage import CPUTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
CHUNK = 16
CHUNK_BYTES = 2 * 2 * CHUNK * 2 * 8 * 2  # [layers, 2, tokens, kv_heads, head_dim] x bfloat16


def engine_with(cpu_chunks: int = 16, **overrides) -> CacheEngine:
    config = load_config(env={}, overrides={"chunk_size": CHUNK, **overrides})
    metrics = EngineMetrics()
    tier = CPUTier(cpu_chunks * CHUNK_BYTES, metrics.for_tier("cpu"))
    return CacheEngine(config, LAYOUT, model_name="test-model", tiers=[tier], metrics=metrics)


def conversation(seed: int, chunks: int) -> list[int]:
    """A prompt of ``chunks`` whole chunks whose tokens are told apart by ``seed``."""
    return [seed * 10_000 + i for i in range(chunks * CHUNK)]


def stored(engine: CacheEngine, tokens: list[int]) -> list:
    """Store ``tokens``' KV and return their spans (what a server does after a turn)."""
    engine.store(tokens, torch.zeros(LAYOUT.shape(len(tokens)), dtype=LAYOUT.dtype))
    return engine.spans(tokens)


def flood(engine: CacheEngine, chunks: int) -> None:
    """Unrelated traffic: enough new prompts to evict every unpinned chunk."""
    for seed in range(1000, 1000 + chunks):
        stored(engine, conversation(seed, 1))


def pins_with(engine: CacheEngine, per_chunks: int, total_chunks: int) -> SessionPins:
    return SessionPins(engine, PinBudget(per_chunks * CHUNK_BYTES, total_chunks * CHUNK_BYTES))


def test_a_pinned_session_survives_traffic_that_evicts_everything_else():
    engine = engine_with(cpu_chunks=16)
    pins = pins_with(engine, per_chunks=8, total_chunks=8)
    mine, other = conversation(1, 4), conversation(2, 4)
    assert pins.extend("s1", stored(engine, mine)) == 4 * CHUNK
    stored(engine, other)
    flood(engine, 40)
    assert engine.lookup(mine) == 4 * CHUNK
    assert engine.lookup(other) == 0
    assert pins.pinned_bytes("s1") == pins.pinned_bytes() == 4 * CHUNK_BYTES


def test_a_second_turn_extends_the_pins_without_pinning_its_prefix_twice():
    engine = engine_with(cpu_chunks=16)
    pins = pins_with(engine, per_chunks=8, total_chunks=8)
    turn1 = conversation(1, 2)
    pins.extend("s1", stored(engine, turn1))
    turn2 = turn1 + conversation(3, 2)  # the history, the answer and a new question
    assert pins.extend("s1", stored(engine, turn2)) == 4 * CHUNK
    assert pins.pinned_bytes("s1") == 4 * CHUNK_BYTES
    flood(engine, 40)
    assert engine.lookup(turn2) == 4 * CHUNK


def test_a_conversation_that_takes_another_path_releases_the_old_one():
    engine = engine_with(cpu_chunks=16)
    pins = pins_with(engine, per_chunks=8, total_chunks=8)
    first = conversation(1, 3)
    pins.extend("s1", stored(engine, first))
    edited = first[:CHUNK] + conversation(4, 2)  # the same first chunk, then another path
    assert pins.extend("s1", stored(engine, edited)) == 3 * CHUNK
    assert pins.pinned_bytes("s1") == 3 * CHUNK_BYTES
    flood(engine, 40)
    assert engine.lookup(edited) == 3 * CHUNK
    assert engine.lookup(first) == CHUNK  # only the shared first chunk is still held


def test_the_per_session_budget_keeps_the_leading_chunks():
    engine = engine_with(cpu_chunks=16)
    pins = pins_with(engine, per_chunks=2, total_chunks=8)
    tokens = conversation(1, 5)
    assert pins.extend("s1", stored(engine, tokens)) == 2 * CHUNK
    flood(engine, 40)
    assert engine.lookup(tokens) == 2 * CHUNK


def test_over_the_total_the_least_recently_used_session_is_unpinned_and_nothing_fails():
    engine = engine_with(cpu_chunks=16)
    pins = pins_with(engine, per_chunks=4, total_chunks=6)
    a, b, c = conversation(1, 3), conversation(2, 3), conversation(3, 3)
    pins.extend("a", stored(engine, a))
    pins.extend("b", stored(engine, b))
    pins.extend("a", stored(engine, a))  # a is used again: b is now the least recent
    assert pins.extend("c", stored(engine, c)) == 3 * CHUNK
    assert pins.pinned_bytes("b") == 0
    assert pins.pinned_bytes() == 6 * CHUNK_BYTES
    assert pins.metrics.registry.get_sample_value(
        "lmcache_ext_session_unpins_total", {"why": "budget"}) == 1
    flood(engine, 40)
    assert engine.lookup(a) == engine.lookup(c) == 3 * CHUNK
    assert engine.lookup(b) == 0


def test_release_lets_the_history_go_and_a_zero_budget_pins_nothing():
    engine = engine_with(cpu_chunks=16)
    pins = pins_with(engine, per_chunks=8, total_chunks=8)
    tokens = conversation(1, 4)
    pins.extend("s1", stored(engine, tokens))
    assert pins.release("s1") == 4 * CHUNK_BYTES
    assert pins.release("s1") == 0
    assert pins.pinned_bytes() == 0
    flood(engine, 40)
    assert engine.lookup(tokens) == 0
    none = pins_with(engine, per_chunks=8, total_chunks=0)
    assert none.extend("s2", stored(engine, tokens)) == 0


def test_chunks_the_cache_never_stored_are_not_pinned():
    engine = engine_with(cpu_chunks=16)
    pins = pins_with(engine, per_chunks=8, total_chunks=8)
    assert pins.extend("s1", engine.spans(conversation(1, 3))) == 0
    assert pins.pinned_bytes() == 0


def test_the_budget_follows_the_config_and_the_cpu_tier():
    engine = engine_with(cpu_chunks=16, session_pin_max_gib=0.5,
                         session_pins_max_fraction=0.25)
    budget = PinBudget.for_engine(engine)
    assert budget.per_session_bytes == 512 * 1024**2
    assert budget.total_bytes == 4 * CHUNK_BYTES


def test_pinned_bytes_and_unpins_are_metrics_in_the_engines_registry():
    engine = engine_with(cpu_chunks=16)
    pins = pins_with(engine, per_chunks=8, total_chunks=8)
    pins.extend("s1", stored(engine, conversation(1, 2)))
    assert engine.metrics.value("session_pinned_bytes") == 2 * CHUNK_BYTES
    pins.close()
    assert engine.metrics.value("session_pinned_bytes") == 0
    assert engine.metrics.value("session_unpins_total", why="ended") == 1


def test_threads_extending_and_releasing_under_pressure_keep_the_budget_and_leak_no_pin():
    """Scenario: 4 threads extend, release and flood at once; the total never passes its
    budget and, once every session is released, nothing stays pinned."""
    engine = engine_with(cpu_chunks=32)
    pins = pins_with(engine, per_chunks=3, total_chunks=8)
    over: list[int] = []

    def work(worker: int) -> None:
        for step in range(30):
            session = f"s{worker}-{step % 3}"
            pins.extend(session, stored(engine, conversation(worker * 10 + step % 3, 3)))
            if step % 4 == 3:
                pins.release(session)
            stored(engine, conversation(5000 + worker * 100 + step, 1))
            if pins.pinned_bytes() > 8 * CHUNK_BYTES:
                over.append(pins.pinned_bytes())
    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert over == []
    pins.close()
    assert pins.pinned_bytes() == 0
    flood(engine, 64)
    for worker in range(4):
        for n in range(3):
            assert engine.lookup(conversation(worker * 10 + n, 3)) == 0
