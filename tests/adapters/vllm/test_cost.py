"""Cost-aware retrieval in the connector, through vLLM's real Scheduler: the workers time vLLM's
forward passes (the prefill speed), the ranks report each chunk's read time, and
``get_num_new_matched_tokens`` offers only the hit worth loading; ``min_retrieve_tokens`` too."""

from __future__ import annotations

import math
import time

import pytest

from lmcache_ext.adapters.vllm.channel import RankAnswer, combine
from tests.adapters.vllm.rig import make_request, step
from tests.adapters.vllm.test_connector import LAYOUTS, PROMPT_A, PROMPT_B, FakeForward, rig_for

FORWARD_S = 0.3  # the stand-in model's time for one prefill step


def matched(rig, req_id: str, prompt: list[int]) -> int:
    """vLLM's question for a new request, its pin dropped afterwards (nothing allocated)."""
    request = make_request(req_id, prompt)
    hit, asynchronous = rig.connector.get_num_new_matched_tokens(request, 0)
    assert asynchronous is False
    rig.connector.update_state_after_alloc(request, None, 0)
    return hit


def save_a_slowly(rig, backend: str) -> None:
    forward = FakeForward(rig, backend, {"a": PROMPT_A})

    def slow(output) -> None:
        time.sleep(FORWARD_S)
        forward(output)
    rig.scheduler.add_request(make_request("a", PROMPT_A))
    step(rig, slow)


def slow_down_tier(rig, tier: str, chunk_read_s: float) -> None:
    """Feed the tier's read-speed average with reads this slow (as real reads would)."""
    engine = rig.worker.engine
    nbytes = math.prod(engine.layout.shape(engine.config.chunk_size)) * \
        engine.layout.dtype.itemsize
    for _ in range(60):
        engine.storage.observe_read(tier, nbytes, chunk_read_s)


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_a_hit_slower_to_load_than_to_recompute_is_not_offered(tmp_path, layout, backend):
    """Scenario: vLLM prefills ~330 tokens/s (a 32-token chunk in ~0.1 s). From the CPU tier a
    chunk loads in microseconds: the 64-token hit is offered. Once that tier reads a chunk in
    1 s, loading loses: no hit, no pin left behind, the skipped tokens counted."""
    rig = rig_for(tmp_path, layout, backend, cost_aware_retrieval=True)
    save_a_slowly(rig, backend)
    prefill = rig.connector.scheduler.cost.prefill_tokens_per_s
    assert prefill is not None and 100 < prefill < len(PROMPT_A) / FORWARD_S * 1.01
    assert matched(rig, "b1", PROMPT_B) == 64
    rig.connector.get_kv_connector_stats()  # start the counts afresh
    slow_down_tier(rig, "cpu", 1.0)
    assert matched(rig, "b2", PROMPT_B) == 0
    assert rig.connector.num_pinned_requests() == 0 and rig.worker.worker.num_pins() == 0
    stats = rig.connector.get_kv_connector_stats().data
    assert stats["cost_skipped_tokens"] == 64 and "hit_tokens" not in stats


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_without_a_measured_prefill_everything_held_is_offered(tmp_path, layout, backend):
    """Scenario: no forward pass timed yet (a fresh engine): the cost model cannot judge, so
    the whole hit is offered even from a slow tier."""
    rig = rig_for(tmp_path, layout, backend, cost_aware_retrieval=True)
    rig.worker.engine.store(PROMPT_A, _kv(rig, len(PROMPT_A)))
    slow_down_tier(rig, "cpu", 1.0)
    assert rig.connector.scheduler.cost.prefill_tokens_per_s is None
    assert matched(rig, "b", PROMPT_B) == 64


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_min_retrieve_tokens_recomputes_short_hits(tmp_path, layout, backend):
    """Scenario: min_retrieve_tokens=96: B's 64-token hit is recomputed, A's 96 is loaded."""
    rig = rig_for(tmp_path, layout, backend, min_retrieve_tokens=96)
    rig.worker.engine.store(PROMPT_A, _kv(rig, len(PROMPT_A)))
    assert matched(rig, "b", PROMPT_B) == 0
    assert matched(rig, "a", PROMPT_A) == 96
    assert rig.connector.num_pinned_requests() == 0


def test_a_chunk_loads_as_slowly_as_its_slowest_rank():
    fast = RankAnswer(3, (("cpu", 3),), {"cpu": 0.001})
    slow = RankAnswer(2, (("cpu", 1), ("disk", 1)), {"cpu": 0.002, "disk": 0.05})
    unmeasured = RankAnswer(2, (("remote", 2),), {})
    answer = combine([fast, slow, unmeasured])
    assert answer.chunks == 2 and answer.load_s == [0.002, 0.05]
    assert combine([]).chunks == 0


def _kv(rig, tokens: int):
    import torch
    layout = rig.worker.engine.layout
    return torch.zeros(layout.shape(tokens), dtype=layout.dtype)
