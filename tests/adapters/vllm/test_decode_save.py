"""``save_decode_cache`` through vLLM's real Scheduler: a finished request's whole chunks of
prompt + output are saved in the next step while vLLM holds its blocks, bit-exactly; off, nothing
past the prompt is stored and blocks are freed at once."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.request import Request, RequestStatus

from tests.adapters.vllm.rig import BLOCK_SIZE, LAYER_NAMES, Rig, make_request, step
from tests.adapters.vllm.test_connector import (
    LAYOUTS,
    PROMPT_A,
    expected_kv,
    read_kv,
    rig_for,
    split_kv,
    token_kv,
)

# PROMPT_A is 100 tokens; 29 sampled tokens make 128 with computed KV (the last sampled token
# has none yet): one whole chunk (96..127) holding prompt and output tokens.
MAX_TOKENS = 29


class ModelForward:
    """Writes the KV of every scheduled position (prefill and decode) of every scheduled
    request into its slot, from the token at that position, like the attention layers do."""

    def __init__(self, rig: Rig, backend: str):
        self.rig, self.backend = rig, backend

    def __call__(self, output) -> None:
        cached = output.scheduled_cached_reqs
        starts = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs}
        starts.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        for req_id, start in starts.items():
            self._write(req_id, start, output.num_scheduled_tokens[req_id])

    def _write(self, req_id: str, start: int, count: int) -> None:
        scheduler = self.rig.scheduler
        tokens = scheduler.requests[req_id].all_token_ids
        blocks = scheduler.kv_cache_manager.get_block_ids(req_id)[0]
        for pos in range(start, start + count):
            block, off = blocks[pos // BLOCK_SIZE], pos % BLOCK_SIZE
            kv = token_kv(tokens[pos], pos)
            for layer, name in enumerate(LAYER_NAMES):
                k, v = split_kv(self.rig.kv_caches[name], self.backend)
                k[block, off] = kv[layer, 0]
                v[block, off] = kv[layer, 1]


def generate(rig: Rig, backend: str, req_id: str, steps: int, max_tokens: int) -> Request:
    """Runs ``steps`` steps of a new request on PROMPT_A, sampling 500, 501, ..."""
    request = make_request(req_id, PROMPT_A, max_tokens=max_tokens)
    rig.scheduler.add_request(request)
    forward = ModelForward(rig, backend)
    for i in range(steps):
        step(rig, forward, token=500 + i)
    return request


def free_blocks(rig: Rig) -> int:
    return rig.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS)
def test_a_finished_request_saves_its_decode_chunk_bit_exactly(tmp_path, layout, backend):
    """Scenario: A (100 prompt tokens) generates 29 tokens; vLLM keeps A's blocks after it
    finishes, the next step saves chunk 96..127 (prompt tail + 28 outputs) and reports A as
    finished sending, and only then are the blocks freed. The stored chunk is the model's KV
    bit for bit; B, whose prompt is A's prompt + output, hits all 128 tokens."""
    rig = rig_for(tmp_path, layout, backend, save_decode_cache=True)
    engine, free = rig.worker.engine, free_blocks(rig)
    a = generate(rig, backend, "a", MAX_TOKENS, MAX_TOKENS)
    tokens = list(a.all_token_ids)
    assert a.is_finished() and len(tokens) == 129
    assert engine.lookup(tokens) == 96  # the prompt's chunks, saved after prefill
    assert "a" in rig.scheduler.requests  # finished, its blocks held for the save
    paged = read_kv(rig, backend, rig.scheduler.kv_cache_manager.get_block_ids("a")[0],
                    range(128))
    want = expected_kv(tokens, range(128))  # [tokens, layers, 2, heads, head_dim]
    assert torch.equal(paged.view(torch.int16), want.view(torch.int16))
    output, _ = step(rig)  # nothing to compute: the save, then the blocks go back
    assert output.total_num_scheduled_tokens == 0
    assert "a" not in rig.scheduler.requests and free_blocks(rig) == free
    assert engine.lookup(tokens) == 128
    stored = torch.zeros(engine.layout.shape(128), dtype=engine.layout.dtype)
    assert engine.retrieve(tokens, stored) == 128
    assert torch.equal(stored.view(torch.int16), want.permute(1, 2, 0, 3, 4).view(torch.int16))
    b = make_request("b", tokens)
    assert rig.connector.get_num_new_matched_tokens(b, 0) == (128, False)
    assert rig.worker.save_failures == 0


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_without_save_decode_cache_nothing_past_the_prompt_is_stored(tmp_path, layout,
                                                                    backend):
    """Scenario: the same generation with the key off (the default): blocks are freed as A
    finishes and only the prompt's chunks are in the engine."""
    rig = rig_for(tmp_path, layout, backend)
    assert rig.connector.config.save_decode_cache is False
    free = free_blocks(rig)
    a = generate(rig, backend, "a", MAX_TOKENS, MAX_TOKENS)
    tokens = list(a.all_token_ids)
    assert "a" not in rig.scheduler.requests and free_blocks(rig) == free
    step(rig)
    assert rig.worker.engine.lookup(tokens) == 96
    assert rig.connector.get_num_new_matched_tokens(make_request("b", tokens), 0) == (96, False)


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_decode_saves_of_aborted_and_short_requests(tmp_path, layout, backend):
    """Scenario: a request aborted during decode saves its computed whole chunks and gives its
    blocks back the next step; one that finishes with 128 tokens holds nothing (the 128th, just
    sampled, has no KV yet, so no whole chunk past the prompt is computed): freed at once."""
    rig = rig_for(tmp_path, layout, backend, save_decode_cache=True)
    engine, free = rig.worker.engine, free_blocks(rig)
    short = generate(rig, backend, "short", MAX_TOKENS - 1, MAX_TOKENS - 1)
    assert short.is_finished() and len(short.all_token_ids) == 128
    assert "short" not in rig.scheduler.requests and free_blocks(rig) == free
    assert engine.lookup(list(short.all_token_ids)) == 96
    a = generate(rig, backend, "a", 40, 100)  # 140 tokens, 139 with KV
    rig.scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    tokens = list(a.all_token_ids)
    assert "a" in rig.scheduler.requests
    step(rig)
    assert "a" not in rig.scheduler.requests and free_blocks(rig) == free
    assert engine.lookup(tokens) == 128
    stored = torch.zeros(engine.layout.shape(128), dtype=engine.layout.dtype)
    assert engine.retrieve(tokens, stored) == 128
    want = expected_kv(tokens, range(128)).permute(1, 2, 0, 3, 4)
    assert torch.equal(stored.view(torch.int16), want.view(torch.int16))
    assert rig.connector.num_pinned_requests() == 0
