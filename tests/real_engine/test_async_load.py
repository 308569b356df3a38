"""Background loads in a real vLLM engine: a hit from a slow tier loads while other requests
keep decoding (vLLM holds it in WAITING_FOR_REMOTE_KVS until the workers report it loaded)."""

from __future__ import annotations

import pytest

from lmcache_ext.testing.slow_proxy import SlowProxy
from lmcache_ext.testing.vllm_engine import synthetic_prompt

CHUNK = 256
HIT_PROMPT = synthetic_prompt(2100, seed=7)  # 8 whole chunks and a partial one
HIT = 2048
DECODE_PROMPT = synthetic_prompt(40, seed=8)
CHUNK_DELAY_S = 0.05  # the slow tier: every request to Redis waits 50 ms on the way


@pytest.fixture
def slow_redis(redis):
    with SlowProxy("127.0.0.1", redis.port, CHUNK_DELAY_S) as proxy:
        yield redis, proxy


def test_a_slow_tier_hit_loads_while_another_request_keeps_decoding(engine_factory,
                                                                    slow_redis):
    """Scenario: a prompt stored in Redis behind a 50 ms link (no CPU tier); evicted from
    vLLM's own cache, it arrives while another request decodes. Its load runs in the
    background: the decoding request keeps producing tokens meanwhile (a load in the step
    would stall it for the whole load: one token at most), and the hit's output is the cold
    run's."""
    server, proxy = slow_redis
    # A buffer for each of the prompt's chunks: with Redis as the first tier a save waits in
    # the step at most 50 ms for each (worker_saves.IO_TIER_WAIT_S), and a chunk across this link
    # takes longer to write: with the default 4, the chunks after the 4th would be skipped.
    engine = engine_factory("async", cache={"chunk_size": CHUNK, "local_cpu": False,
                                            "remote_url": proxy.url(),
                                            "remote_timeout_s": 10.0,
                                            "staging_chunks": HIT // CHUNK})
    cold = engine.generate(HIT_PROMPT, 1)
    assert cold.cached_tokens == 0
    engine.reset_prefix_cache()
    assert server.wait_for_values(HIT // CHUNK) >= HIT // CHUNK  # saved across the link
    run = engine.decode_during_hit(DECODE_PROMPT, 48, HIT_PROMPT, inject_after=4)
    assert (run.hit_cached, run.hit_token_ids) == (HIT, cold.token_ids), run
    assert run.tokens_while_hit_waited() >= 3, (run, engine.log_tail())
    assert len(run.token_times) == 48
