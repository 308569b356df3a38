"""Generation with the cache in the path: identical greedy output, hits, stores, cost-awareness."""

from __future__ import annotations

import time

import pytest

from lmcache_ext.config import load_config
from lmcache_ext.cost import CostModel
from lmcache_ext.engine import CacheEngine
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.serving.generator import GenerationStats, Generator, SamplingParams
from lmcache_ext.storage import CPUTier

CHUNK = 32
GREEDY = SamplingParams(max_new_tokens=12)


def engine_for(model, tiers=None, **overrides) -> CacheEngine:
    config = load_config(env={}, overrides={"chunk_size": CHUNK, "max_local_cpu_size": 0.05,
                                            **overrides})
    return CacheEngine(config, model.layout, model_name=model.name, tiers=tiers)


def run(generator: Generator, ids: list[int], params: SamplingParams = GREEDY):
    stats = GenerationStats()
    tokens = [event.token_id for event in generator.generate(ids, params, stats)]
    return tokens, stats


def prompt(model, text: str) -> list[int]:
    return model.tokenizer(text)["input_ids"]


DOC = "The quick brown fox jumps over the lazy dog. " * 6


def test_greedy_output_is_identical_with_and_without_the_cache(tiny_model):
    plain = Generator(tiny_model, None, CHUNK)
    cached = Generator(tiny_model, engine_for(tiny_model), CHUNK)
    for question in ("Where?", "Who jumps?", "Where?"):
        ids = prompt(tiny_model, DOC + question)
        assert run(cached, ids)[0] == run(plain, ids)[0]
    _, stats = run(cached, prompt(tiny_model, DOC + "Why?"))
    assert stats.loaded_tokens > 0 and stats.loaded_tokens % CHUNK == 0


def test_first_request_stores_full_chunks_and_the_second_loads_them(tiny_model):
    generator = Generator(tiny_model, engine_for(tiny_model), CHUNK)
    ids = prompt(tiny_model, DOC + "A?")
    _, cold = run(generator, ids)
    assert cold.loaded_tokens == 0 and cold.stored_tokens == len(ids) // CHUNK * CHUNK
    _, warm = run(generator, prompt(tiny_model, DOC + "B?"))
    assert warm.loaded_tokens == warm.cached_tokens >= len(DOC) // CHUNK * CHUNK - CHUNK
    assert warm.stored_tokens <= CHUNK  # only the chunk(s) after the shared prefix are new


def test_a_fully_cached_prompt_recomputes_its_last_chunk(tiny_model):
    generator = Generator(tiny_model, engine_for(tiny_model), CHUNK)
    ids = prompt(tiny_model, DOC)[: 4 * CHUNK]  # exactly 4 chunks
    first, _ = run(generator, ids)
    again, stats = run(generator, ids)
    assert again == first
    assert stats.loaded_tokens == 3 * CHUNK


def test_sampling_with_a_seed_repeats_and_stop_strings_cut_the_text(tiny_model):
    generator = Generator(tiny_model, engine_for(tiny_model), CHUNK)
    ids = prompt(tiny_model, DOC)
    params = SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9,
                            top_k=50, seed=7)
    assert run(generator, ids, params)[0] == run(generator, ids, params)[0]
    _, stats = run(generator, ids, SamplingParams(max_new_tokens=30))
    stop = stats.text[3:5]
    _, stopped = run(generator, ids, SamplingParams(max_new_tokens=30, stop=(stop,)))
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert stats.text.startswith(stopped.text)


class SlowTier(CPUTier):
    """A real CPU tier whose reads take 50 ms a chunk: slower than recomputing here."""

    name = "slow"

    def get(self, key):
        time.sleep(0.05)
        return super().get(key)


def test_a_hit_in_a_tier_slower_than_recomputing_is_not_loaded(tiny_model):
    """Scenario: a slow tier must not make TTFT worse than recomputing (SGLang's disk hits)."""
    metrics = EngineMetrics()
    slow = SlowTier(10 * 2**20, metrics.for_tier("slow"))
    engine = engine_for(tiny_model, tiers=[slow], local_cpu=True)
    nbytes = 2 * 2 * CHUNK * 2 * 16 * 4
    cost = CostModel(CHUNK, nbytes)
    cost.observe_prefill(1000, 0.1)  # 10K tokens/s: 3 ms a chunk, against 50 ms to read one
    engine.probe_read_speeds()
    generator = Generator(tiny_model, engine, CHUNK, cost)
    ids = prompt(tiny_model, DOC + "Q?")
    cold, _ = run(generator, ids)
    warm, stats = run(generator, ids)
    assert stats.cached_tokens > 0 and stats.loaded_tokens == 0
    assert stats.plan is not None and stats.plan.load_tokens == 0
    assert warm == cold


def test_min_retrieve_tokens_skips_short_hits(tiny_model):
    engine = engine_for(tiny_model, min_retrieve_tokens=10 * CHUNK)
    cost = CostModel(CHUNK, 1, min_retrieve_tokens=10 * CHUNK)
    generator = Generator(tiny_model, engine, CHUNK, cost)
    ids = prompt(tiny_model, DOC + "Q?")
    run(generator, ids)
    assert run(generator, ids)[1].loaded_tokens == 0


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_real_model_greedy_output_is_identical_across_cpu_and_disk_hits(smollm2, tmp_path, tier):
    """Scenario: the default SmolLM2 model, a RAG-style prompt, hits from CPU then from disk."""
    overrides = {"chunk_size": 64, "max_local_cpu_size": 0.2}
    if tier == "disk":
        overrides |= {"local_disk": str(tmp_path), "max_local_disk_size": 0.2,
                      "extra_config": {"use_odirect": True}}
    config = load_config(env={}, overrides=overrides)
    engine = CacheEngine(config, smollm2.layout, model_name=smollm2.name)
    cached = Generator(smollm2, engine, 64)
    plain = Generator(smollm2, None, 64)
    doc = "Paris is the capital of France. Berlin is the capital of Germany. " * 8
    ids = prompt(smollm2, doc + "What is the capital of Germany?")
    expected, _ = run(plain, ids)
    assert run(cached, ids)[0] == expected  # cold: stores
    if tier == "disk":
        engine.flush()
        for span in engine.spans(ids):  # empty the CPU tier: the next hit comes from disk
            engine.storage.tiers[0].remove(span.key)
        assert set(engine.locate(ids)) == {"disk"}
    tokens, stats = run(cached, ids)
    assert stats.loaded_tokens >= 64 and tokens == expected
    engine.close()


def test_served_requests_count_as_lookups_in_the_metrics(tiny_model):
    engine = engine_for(tiny_model)
    generator = Generator(tiny_model, engine, CHUNK)
    ids = prompt(tiny_model, DOC + "Q?")
    run(generator, ids)
    run(generator, ids)
    assert engine.metrics.value("lookups_total") == 2
    assert engine.metrics.value("lookup_hit_tokens_total") > 0
