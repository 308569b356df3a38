"""The vLLM V1 connector through vLLM's real Scheduler, request objects and KV cache allocation,
on CPU tensors: saves, chunk-aligned hits, bit-exact loads, pins, load errors, salts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

from lmcache_ext.adapters.vllm import compat as vllm_compat
from lmcache_ext.config import ConfigError
from tests.adapters.vllm.rig import (
    BLOCK_SIZE,
    CHUNK,
    HEAD_DIM,
    LAYER_NAMES,
    Rig,
    complete,
    make_request,
    make_rig,
    step,
    vllm_config,
)

# (vLLM KVCacheLayout, attention backend whose reading of the packed view we emulate)
LAYOUTS = [("LBNHC", "FLASH_ATTN"), ("BLNHC", "FLASH_ATTN"), ("LBHNC", "CPU_ATTN")]
if vllm_compat.VLLM_VERSION < vllm_compat.PACKED_SINCE:
    # 0.23: per-layer tensors in the CPU and the FlashAttention backend's own shapes
    LAYOUTS = [("legacy", "CPU_ATTN"), ("legacy", "FLASH_ATTN")]
SHARED = list(range(1000, 1080))  # 80 tokens: 2 whole chunks of 32 + 16
PROMPT_A = SHARED + list(range(2000, 2020))  # 100 tokens
PROMPT_B = SHARED + list(range(3000, 3040))  # 120 tokens, shares 64 chunk-aligned tokens


def split_kv(cache: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as [blocks, block_size, heads, head_dim], by the backend's own expressions."""
    if cache.dim() == 5:  # vllm/v1/attention/backends/flash_attn.py (0.23)
        k, v = cache.unbind(1)
        return k, v
    if cache.dim() == 4 and backend == "CPU_ATTN":  # vllm/v1/attention/backends/cpu_attn.py
        blocks, heads, size, _ = cache.shape
        k, v = cache.view(blocks, heads, size * 2, -1).chunk(2, dim=2)
        return k.transpose(1, 2), v.transpose(1, 2)
    # vllm/v1/attention/backends/flash_attn.py (0.33)
    k, v = cache.transpose(1, 2).split(HEAD_DIM, dim=-1)
    return k, v


def token_kv(token: int, position: int) -> torch.Tensor:
    """Deterministic KV bits of one token [layers, 2, heads, head_dim] (a stand-in model)."""
    generator = torch.Generator().manual_seed(token * 4099 + position)
    shape = (len(LAYER_NAMES), 2, 2, HEAD_DIM)
    return torch.randint(-2**15, 2**15, shape, generator=generator,
                         dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


class FakeForward:
    """Writes each scheduled token's KV into its slot like the attention layer would."""

    def __init__(self, rig: Rig, backend: str, prompts: dict[str, list[int]]):
        self.rig, self.backend, self.prompts = rig, backend, prompts
        self.blocks: dict[str, list[int]] = {}

    def __call__(self, output) -> None:
        for new in output.scheduled_new_reqs:
            self.blocks[new.req_id] = list(new.block_ids[0])
            self._write(new.req_id, new.num_computed_tokens,
                        output.num_scheduled_tokens[new.req_id])
        cached = output.scheduled_cached_reqs  # a chunked prefill's later steps
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in self.blocks or req_id in cached.resumed_req_ids:
                continue
            if cached.new_block_ids[i]:
                self.blocks[req_id] += list(cached.new_block_ids[i][0])
            self._write(req_id, cached.num_computed_tokens[i],
                        output.num_scheduled_tokens[req_id])

    def _write(self, req_id: str, start: int, count: int) -> None:
        prompt = self.prompts[req_id]
        for pos in range(start, min(start + count, len(prompt))):
            block, off = self.blocks[req_id][pos // BLOCK_SIZE], pos % BLOCK_SIZE
            kv = token_kv(prompt[pos], pos)
            for layer, name in enumerate(LAYER_NAMES):
                k, v = split_kv(self.rig.kv_caches[name], self.backend)
                k[block, off] = kv[layer, 0]
                v[block, off] = kv[layer, 1]


def read_kv(rig: Rig, backend: str, block_ids: list[int], positions: range) -> torch.Tensor:
    rows = []
    for pos in positions:
        block, off = block_ids[pos // BLOCK_SIZE], pos % BLOCK_SIZE
        per_layer = [torch.stack([part[block, off] for part in split_kv(rig.kv_caches[n],
                                                                            backend)])
                     for n in LAYER_NAMES]
        rows.append(torch.stack(per_layer))
    return torch.stack(rows)


def expected_kv(prompt: list[int], positions: range) -> torch.Tensor:
    return torch.stack([token_kv(prompt[p], p) for p in positions])


def zero_caches(rig: Rig) -> None:
    for cache in rig.kv_caches.values():
        cache.zero_()


def preemption_only(template, req_id: str):
    """A SchedulerOutput of a step that preempted ``req_id`` and scheduled nothing (vLLM's own
    empty output, with the preemption set as the scheduler sets it)."""
    from vllm.v1.core.sched.output import CachedRequestData
    return dataclasses.replace(template, scheduled_new_reqs=[],
                               scheduled_cached_reqs=CachedRequestData.make_empty(),
                               num_scheduled_tokens={}, preempted_req_ids={req_id})


def pinned_chunks(rig: Rig) -> int:
    return sum(entry.pins for tier in rig.worker.engine.storage.tiers
               for entry in getattr(tier, "_index", {}).values())


def drop_chunk(rig: Rig, prompt: list[int], index: int) -> None:
    """Remove chunk ``index`` of ``prompt`` from the first tier, pinned or not (as an eviction
    or a deletion between a lookup and its load would)."""
    key = rig.worker.engine.spans(prompt)[index].key
    tier = rig.worker.engine.storage.tiers[0]
    tier._index[key].pins = 0  # drop our pin's hold so the chunk can go
    assert tier.remove(key)


def rig_for(tmp_path, layout: str, backend: str, prefix_caching: bool = False,
            over_ipc: bool = False, **extra) -> Rig:
    config = vllm_config(tmp_path, layout, prefix_caching, **extra)
    legacy = vllm_compat.VLLM_VERSION < vllm_compat.PACKED_SINCE
    if backend != "CPU_ATTN" and not legacy:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        config.attention_config.backend = AttentionBackendEnum[backend]
    return make_rig(config, backend, over_ipc)


def save_prompt_a(rig: Rig, backend: str) -> FakeForward:
    forward = FakeForward(rig, backend, {"a": PROMPT_A, "b": PROMPT_B})
    rig.scheduler.add_request(make_request("a", PROMPT_A))
    step(rig, forward)  # prefill + one token: finished (max_tokens=1)
    engine = rig.worker.engine
    assert engine.lookup(PROMPT_A) == 96
    # What the engine holds is the model's KV in [layers, 2, tokens, heads, head_dim], not
    # some permutation of it that would only round-trip into the same kind of block.
    stored = torch.zeros(engine.layout.shape(96), dtype=engine.layout.dtype)
    assert engine.retrieve(PROMPT_A, stored) == 96
    want = expected_kv(PROMPT_A, range(96)).permute(1, 2, 0, 3, 4)
    assert torch.equal(stored.view(torch.int16), want.view(torch.int16))
    return forward


@pytest.mark.parametrize(("layout", "backend", "over_ipc"),
                         [(*lb, False) for lb in LAYOUTS] + [(*LAYOUTS[0], True)])
def test_second_request_loads_the_shared_prefix_bit_exactly(tmp_path, layout, backend,
                                                            over_ipc):
    """Scenario: A is saved from vLLM's paged views; B shares 80 tokens; B's matched count is
    the chunk-aligned 64 and its fresh blocks then hold A's KV for them, bit for bit (the
    scheduler asking the worker's cache in-process, and over its socket)."""
    rig = rig_for(tmp_path, layout, backend, over_ipc=over_ipc)
    forward = save_prompt_a(rig, backend)
    b = make_request("b", PROMPT_B)
    assert rig.connector.get_num_new_matched_tokens(b, 0) == (64, False)
    assert rig.connector.get_num_new_matched_tokens(b, 0) == (64, False)  # no side effects
    assert rig.connector.get_num_new_matched_tokens(b, 32) == (32, False)
    zero_caches(rig)  # whatever was in the blocks before, only the load can put KV back
    rig.scheduler.add_request(b)
    output = rig.scheduler.schedule()
    (new,) = output.scheduled_new_reqs
    assert new.num_computed_tokens == 64
    assert rig.connector.num_pinned_requests() == 1
    assert rig.worker.worker.num_pins() == 1 and pinned_chunks(rig) == 2
    rig.worker.bind_connector_metadata(output.kv_connector_metadata)
    rig.worker.start_load_kv(None)
    assert rig.worker.get_block_ids_with_load_errors() == set()
    assert rig.worker.worker.num_pins() == 0 and pinned_chunks(rig) == 0  # dropped once loaded
    blocks = list(new.block_ids[0])
    got = read_kv(rig, backend, blocks, range(64))
    assert torch.equal(got.view(torch.int16), expected_kv(PROMPT_B, range(64)).view(torch.int16))
    untouched = read_kv(rig, backend, blocks, range(64, len(PROMPT_B)))
    assert torch.count_nonzero(untouched.view(torch.int16)) == 0  # never past the load
    del forward


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_what_the_store_holds_at_the_lookup_is_not_gathered_again(tmp_path, layout, backend):
    """Scenario: A is saved; a prompt starting with A's 3 chunks and one new chunk hits those
    3. Its save plans only the chunk the store lacked at the lookup, so a store without an
    in-memory tier (Redis alone), which the step cannot ask, does not copy the hit's KV out of
    vLLM's blocks again."""
    rig = rig_for(tmp_path, layout, backend)
    forward = save_prompt_a(rig, backend)
    longer = PROMPT_A[:96] + list(range(5000, 5040))  # 3 held chunks, 1 new, 8 more tokens
    rig.scheduler.add_request(make_request("c", longer))
    output = rig.scheduler.schedule()
    saves = [op for op in output.kv_connector_metadata.saves if op.req_id == "c"]
    assert [(op.start, op.end) for op in saves] == [(96, 128)]
    del forward


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_full_hit_recomputes_the_last_block_and_vllm_own_hits_come_first(tmp_path, layout,
                                                                          backend):
    rig = rig_for(tmp_path, layout, backend, prefix_caching=True)
    save_prompt_a(rig, backend)
    exact = make_request("c", PROMPT_A[:96])  # 96 tokens, all three chunks cached
    # vLLM computes at least the last token, from the start of its block (as after its own
    # prefix-cache hits): the last block is recomputed.
    assert rig.connector.get_num_new_matched_tokens(exact, 0) == (96 - BLOCK_SIZE, False)
    # vLLM's own prefix cache already holds 80 tokens of B: we add nothing below that.
    assert rig.connector.get_num_new_matched_tokens(make_request("b", PROMPT_B), 80) == (0,
                                                                                          False)


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_finished_aborted_and_preempted_requests_leave_nothing_pinned(tmp_path, layout,
                                                                      backend):
    from vllm.v1.request import RequestStatus
    rig = rig_for(tmp_path, layout, backend)
    save_prompt_a(rig, backend)
    # Aborted while its load is scheduled.
    rig.scheduler.add_request(make_request("abort", PROMPT_B))
    rig.scheduler.schedule()
    assert rig.connector.num_pinned_requests() == 1 and pinned_chunks(rig) == 2
    rig.scheduler.finish_requests("abort", RequestStatus.FINISHED_ABORTED)
    assert rig.connector.num_pinned_requests() == 0 and pinned_chunks(rig) == 0
    # Preempted (vLLM's own preemption path) while running.
    rig.scheduler.add_request(make_request("preempt", PROMPT_B, max_tokens=4))
    step(rig)
    assert rig.connector.num_pinned_requests() == 1
    assert pinned_chunks(rig) == 0  # the worker dropped the pin once its load was done
    rig.scheduler.reset_prefix_cache(reset_running_requests=True)  # preempts every running one
    output = rig.scheduler.schedule()  # resumed at once: its own saved prompt is now a hit
    assert [op.req_id for op in output.kv_connector_metadata.loads] == ["preempt"]
    assert pinned_chunks(rig) == 3  # the resumed load's pin (3 chunks) only, not also the old 2
    rig.scheduler.finish_requests("preempt", RequestStatus.FINISHED_ABORTED)
    assert rig.connector.num_pinned_requests() == 0 and pinned_chunks(rig) == 0
    # Preempted and left waiting (no blocks for it): the preemption alone drops the pin.
    rig.scheduler.add_request(make_request("waits", PROMPT_B, max_tokens=4))
    step(rig)
    assert rig.connector.num_pinned_requests() == 1
    rig.scheduler.reset_prefix_cache(reset_running_requests=True)
    rig.connector.build_connector_meta(preemption_only(output, "waits"))
    assert rig.connector.num_pinned_requests() == 0 and pinned_chunks(rig) == 0
    rig.scheduler.finish_requests("waits", RequestStatus.FINISHED_ABORTED)
    assert rig.connector.num_pinned_requests() == 0 and pinned_chunks(rig) == 0
    # Finished normally.
    rig.scheduler.add_request(make_request("done", PROMPT_B))
    step(rig)
    assert rig.connector.num_pinned_requests() == 0 and pinned_chunks(rig) == 0


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_a_load_that_finds_its_chunks_gone_is_reported_never_used(tmp_path, layout, backend):
    """Scenario: a chunk vanishes between the scheduler's decision and the load (here removed
    from the tier by hand): its blocks come back from get_block_ids_with_load_errors."""
    rig = rig_for(tmp_path, layout, backend)
    save_prompt_a(rig, backend)
    rig.scheduler.add_request(make_request("b", PROMPT_B))
    output = rig.scheduler.schedule()
    blocks = list(output.scheduled_new_reqs[0].block_ids[0])
    drop_chunk(rig, PROMPT_B, 1)
    rig.worker.bind_connector_metadata(output.kv_connector_metadata)
    rig.worker.start_load_kv(None)
    # Tokens 32..63 (blocks 2 and 3) are missing: both reported, the first chunk was loaded.
    assert rig.worker.get_block_ids_with_load_errors() == {blocks[2], blocks[3]}
    assert rig.worker.get_block_ids_with_load_errors() == set()  # reported once


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_a_chunk_a_load_missed_is_saved_again_once_recomputed(tmp_path, layout, backend):
    """Scenario: B's lookup finds 2 chunks, so its save plans only the chunk after them; the
    second vanishes before the load. vLLM recomputes from it, and that recompute saves it
    again: the next lookup finds all of B's chunks."""
    rig = rig_for(tmp_path, layout, backend)
    save_prompt_a(rig, backend)
    rig.scheduler.add_request(make_request("b", PROMPT_B))
    output = rig.scheduler.schedule()
    assert [(s.start, s.end) for s in output.kv_connector_metadata.saves] == [(64, 96)]
    drop_chunk(rig, PROMPT_B, 1)
    _, errors = complete(rig, output)
    assert errors  # blocks 2 and 3: vLLM recomputes from token 32
    output = rig.scheduler.schedule()
    assert [(s.start, s.end) for s in output.kv_connector_metadata.saves] == [(32, 96)]
    complete(rig, output)
    rig.worker.worker.saves.jobs.join()
    assert rig.worker.engine.lookup(PROMPT_B) == 96


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_lora_and_cache_salt_separate_the_keys(tmp_path, layout, backend):
    from vllm.lora.request import LoRARequest
    rig = rig_for(tmp_path, layout, backend)
    save_prompt_a(rig, backend)
    plain = make_request("p", PROMPT_B)
    salted = make_request("s", PROMPT_B, cache_salt="tenant-1")
    lora = make_request("l", PROMPT_B, lora_request=LoRARequest("adapter", 1, "/nonexistent"))
    assert rig.connector.get_num_new_matched_tokens(plain, 0) == (64, False)
    assert rig.connector.get_num_new_matched_tokens(salted, 0) == (0, False)
    assert rig.connector.get_num_new_matched_tokens(lora, 0) == (0, False)


def test_bad_engine_config_in_extra_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="chunk_size") as raised:
        rig_for(tmp_path, LAYOUTS[0][0], LAYOUTS[0][1], chunk_size=100)
    assert len(raised.value.problems) == 1


def test_vllm_keeps_a_preempted_requests_output_despite_a_pending_save(tmp_path):
    """Scenario: kv_role kv_both makes vLLM's default ``requires_kv_delivery`` True (a producer's
    hand-off must land); ours is a best-effort cache (a dropped save is a future miss), and
    vLLM's real scheduler takes that: it does not drop a preempted request's output."""
    rig = rig_for(tmp_path, *LAYOUTS[0])
    assert rig.connector._kv_transfer_config.is_kv_producer  # the base class would say True
    if not hasattr(KVConnectorBase_V1, "requires_kv_delivery"):
        pytest.skip(f"vLLM {vllm_compat.VLLM_VERSION} has no requires_kv_delivery")
    assert rig.scheduler.requires_kv_delivery is False  # what _preempt_request is given


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[-1:])
def test_a_full_hit_loads_whole_blocks_and_leaves_the_last_block_to_vllm(tmp_path, layout,
                                                                          backend):
    """Scenario: a full hit loads every block but the last (vLLM computes from a block's start,
    as after its own prefix-cache hits); the last block's slots stay as vLLM left them."""
    rig = rig_for(tmp_path, layout, backend)
    save_prompt_a(rig, backend)
    zero_caches(rig)
    rig.scheduler.add_request(make_request("exact", PROMPT_A[:96]))
    output = rig.scheduler.schedule()
    (new,) = output.scheduled_new_reqs
    loaded = new.num_computed_tokens
    assert loaded == 96 - BLOCK_SIZE
    rig.worker.bind_connector_metadata(output.kv_connector_metadata)
    rig.worker.start_load_kv(None)
    blocks = list(new.block_ids[0])
    got = read_kv(rig, backend, blocks, range(96))
    assert torch.equal(got[:loaded].view(torch.int16),
                       expected_kv(PROMPT_A, range(loaded)).view(torch.int16))
    assert torch.count_nonzero(got[loaded:].view(torch.int16)) == 0


# ---------------------------------------------------------------------- background loads


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_a_background_load_waits_unscheduled_then_runs_on_its_loaded_kv(tmp_path, layout,
                                                                         backend):
    """Scenario (async_load=always): B's hit loads off the step. vLLM holds B unscheduled
    (WAITING_FOR_REMOTE_KVS) while the loader fills its blocks; once the worker reports it
    finished receiving, B is scheduled with the loaded tokens computed, its blocks hold A's KV
    bit for bit, and nothing stays pinned."""
    from vllm.v1.request import RequestStatus
    rig = rig_for(tmp_path, layout, backend, async_load="always")
    save_prompt_a(rig, backend)
    b = make_request("b", PROMPT_B)
    assert rig.connector.get_num_new_matched_tokens(b, 0) == (64, True)
    zero_caches(rig)
    rig.scheduler.add_request(b)
    output = rig.scheduler.schedule()
    assert output.scheduled_new_reqs == [] and b.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    (op,) = output.kv_connector_metadata.loads
    assert (op.req_id, op.start, op.end, op.background) == ("b", 0, 64, True)
    _, errors = complete(rig, output)
    assert errors == set() and rig.scheduler.finished_recving_kv_req_ids == {"b"}
    assert rig.worker.worker.num_pins() == 0 and pinned_chunks(rig) == 0
    got = read_kv(rig, backend, op.block_ids, range(64))
    assert torch.equal(got.view(torch.int16), expected_kv(PROMPT_B, range(64)).view(torch.int16))
    output = rig.scheduler.schedule()
    (new,) = output.scheduled_new_reqs
    assert (new.req_id, new.num_computed_tokens) == ("b", 64)
    assert list(new.block_ids[0])[:4] == op.block_ids[:4]  # the blocks the load filled
    assert output.kv_connector_metadata.loads == []  # loaded once, never again in the step


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_slow_tiers_load_in_the_background_and_cpu_hits_in_the_step(tmp_path, layout, backend):
    """async_load=slow_tiers (the default): a hit held in the CPU tier loads in the step (it
    is faster there); the same hit held only on disk loads in the background."""
    rig = rig_for(tmp_path, layout, backend)
    save_prompt_a(rig, backend)
    assert rig.connector.get_num_new_matched_tokens(make_request("b", PROMPT_B), 0) == (64, False)
    (tmp_path / "disk").mkdir()
    disk = rig_for(tmp_path / "disk", layout, backend, local_cpu=False,
                   local_disk=str(tmp_path / "kv"), max_local_disk_size=0.01)
    save_prompt_a(disk, backend)
    assert disk.connector.get_num_new_matched_tokens(make_request("b", PROMPT_B), 0) == (64, True)


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_a_background_load_that_finds_a_chunk_gone_is_recomputed_from_there(tmp_path, layout,
                                                                            backend):
    """Scenario: the second chunk vanishes before the background load reads it. The blocks it
    could not fill are reported in the step that reports the load finished, and vLLM
    schedules B with only the first chunk computed: it recomputes the rest, never reads the
    unfilled blocks as KV."""
    rig = rig_for(tmp_path, layout, backend, async_load="always")
    save_prompt_a(rig, backend)
    rig.scheduler.add_request(make_request("b", PROMPT_B))
    output = rig.scheduler.schedule()
    (op,) = output.kv_connector_metadata.loads
    drop_chunk(rig, PROMPT_B, 1)
    _, errors = complete(rig, output)
    assert errors == {op.block_ids[2], op.block_ids[3]}
    output = rig.scheduler.schedule()
    (new,) = output.scheduled_new_reqs
    assert (new.req_id, new.num_computed_tokens) == ("b", 32)
    # The chunk the load missed is recomputed and saved again, from where it was lost.
    assert [(s.start, s.end) for s in output.kv_connector_metadata.saves] == [(32, 96)]
    complete(rig, output)
    rig.worker.wait_for_save()
    rig.worker.worker.saves.jobs.join()
    assert rig.worker.engine.lookup(PROMPT_B) == 96


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_a_request_aborted_while_its_background_load_runs_leaks_nothing(tmp_path, layout,
                                                                        backend):
    """Scenario: B is aborted after its background load was handed to the worker. vLLM keeps
    B's blocks until the worker reports the load done, then frees them; no pin stays, and a
    later request still hits."""
    from vllm.v1.request import RequestStatus
    rig = rig_for(tmp_path, layout, backend, async_load="always")
    save_prompt_a(rig, backend)
    rig.scheduler.add_request(make_request("b", PROMPT_B))
    output = rig.scheduler.schedule()
    free_before = rig.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    rig.scheduler.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert rig.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free_before
    assert complete(rig, output)[1] == set()
    assert rig.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() > free_before
    assert "b" not in rig.scheduler.requests
    assert rig.connector.num_pinned_requests() == 0 and pinned_chunks(rig) == 0
    c = make_request("c", PROMPT_B)
    assert rig.connector.get_num_new_matched_tokens(c, 0) == (64, True)


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_a_failed_load_in_the_step_is_recomputed_never_a_failed_request(tmp_path, layout,
                                                                       backend):
    """vLLM's default kv_load_failure_policy fails a request whose load failed; the connector
    sets it to recompute. Scenario: a chunk vanishes before B's load in the step: B is
    rescheduled from the first chunk it did load and finishes normally."""
    from vllm.v1.engine import FinishReason
    rig = rig_for(tmp_path, layout, backend)
    assert rig.scheduler.recompute_kv_load_failures
    save_prompt_a(rig, backend)
    rig.scheduler.add_request(make_request("b", PROMPT_B))
    output = rig.scheduler.schedule()
    blocks = list(output.scheduled_new_reqs[0].block_ids[0])
    engine = rig.worker.engine
    key = engine.spans(PROMPT_B)[1].key
    engine.storage.tiers[0]._index[key].pins = 0
    assert engine.storage.tiers[0].remove(key)
    _, errors = complete(rig, output)
    assert errors == {blocks[2], blocks[3]}
    b = rig.scheduler.requests["b"]
    assert not b.is_finished() and b.num_computed_tokens == 32
    step(rig)
    assert b.is_finished() and b.get_finished_reason() == FinishReason.LENGTH


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_a_16x_longer_prompt_moves_through_the_same_fixed_staging_buffers(tmp_path, layout,
                                                                          backend):
    """Bounded transfer memory: saves move KV chunk by chunk through ``staging_chunks``
    buffers allocated once. A 1-chunk prompt and a 16-chunk prompt leave the staging area as
    it was (two chunks' worth), and the 16 chunks that went through its two buffers come back
    bit for bit."""
    rig = rig_for(tmp_path, layout, backend, staging_chunks=2)
    staging = rig.worker.worker.kv.staging
    engine = rig.worker.engine
    chunk_bytes = engine.layout.dtype.itemsize * int(torch.Size(engine.layout.shape(CHUNK))
                                                     .numel())
    assert (staging.count, staging.allocated_bytes) == (2, 2 * chunk_bytes)
    short, long = list(range(5000, 5000 + CHUNK)), list(range(6000, 6000 + 16 * CHUNK))
    forward = FakeForward(rig, backend, {"short": short, "long": long})
    for name, prompt in (("short", short), ("long", long)):
        rig.scheduler.add_request(make_request(name, prompt))
        step(rig, forward)
        assert engine.lookup(prompt) == len(prompt)
        assert (staging.count, staging.allocated_bytes) == (2, 2 * chunk_bytes)
    stored = torch.zeros(engine.layout.shape(len(long)), dtype=engine.layout.dtype)
    assert engine.retrieve(long, stored) == len(long)
    want = expected_kv(long, range(len(long))).permute(1, 2, 0, 3, 4)
    assert torch.equal(stored.view(torch.int16), want.view(torch.int16))
