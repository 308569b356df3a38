"""The worker's GPU-path rules, on the CPU code path they share: staging buffers
that always come back, a lookup that never waits for the saver nor reads a slow tier, a chunked
prefill saved step by step, the load probe timing the real load path, leases held until their
copy is done, and a background load ordered after vLLM's stream (the streams themselves:
tests/kernels/test_streams.py)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from lmcache_ext import kernels
from lmcache_ext.adapters.vllm import load_pipeline
from lmcache_ext.adapters.vllm.channel import LookupRequest
from lmcache_ext.adapters.vllm.load_pipeline import LoadPipeline, LoadStreams
from lmcache_ext.adapters.vllm.staging import StagingArea, StagingTimeout
from lmcache_ext.adapters.vllm.stats import STAGES
from lmcache_ext.chunk import KVLayout
from lmcache_ext.codecs import ChunkStage
from lmcache_ext.kernels import reference
from lmcache_ext.kernels.streams import StreamOrder
from lmcache_ext.keys import ChunkKey
from lmcache_ext.metrics import EngineMetrics
from lmcache_ext.storage import Chunk, CPUTier, DiskTier
from tests.adapters.vllm.rig import CHUNK, make_request, step
from tests.adapters.vllm.test_connector import (
    LAYOUTS,
    PROMPT_A,
    PROMPT_B,
    FakeForward,
    expected_kv,
    read_kv,
    rig_for,
    save_prompt_a,
    zero_caches,
)

LAYOUT, BACKEND = LAYOUTS[0]


def load_b(rig, forward: FakeForward) -> set[int]:
    """Schedule B (a 64-token hit on A's chunks) and run its step; the load errors."""
    rig.scheduler.add_request(make_request("b", PROMPT_B))
    output, errors = step(rig, forward)
    return errors


def b_blocks_hold_a_prefix(rig, forward: FakeForward) -> bool:
    got = read_kv(rig, BACKEND, forward.blocks["b"], range(64))
    return torch.equal(got.view(torch.int16), expected_kv(PROMPT_B, range(64)).view(torch.int16))


# ------------------------------------------------------------------ fix 2: staging buffers

def test_failing_scatters_are_recomputed_and_never_use_up_the_staging_buffers(tmp_path,
                                                                               monkeypatch):
    """Scenario: the scatter fails for more loads than there are staging buffers. Each load's
    blocks are reported for recompute, every buffer comes back (before: one leaked per failure
    and the load after staging_chunks failures blocked forever), and once the scatter works
    again B loads bit-exactly."""
    rig = rig_for(tmp_path, LAYOUT, BACKEND, staging_chunks=2)
    forward = save_prompt_a(rig, BACKEND)
    real_scatter = load_pipeline.kernels.scatter

    def broken(*args, **kwargs):
        raise RuntimeError("scatter failed (injected)")
    monkeypatch.setattr(load_pipeline.kernels, "scatter", broken)
    staging = rig.worker.worker.kv.staging
    for attempt in range(staging.count + 2):
        req = f"fail-{attempt}"
        forward.prompts[req] = PROMPT_B
        rig.scheduler.add_request(make_request(req, PROMPT_B))
        output, errors = step(rig, forward)
        assert errors, "a failed load is reported, its blocks recomputed"
        assert staging.free() == staging.count
    monkeypatch.setattr(load_pipeline.kernels, "scatter", real_scatter)
    zero_caches(rig)
    assert load_b(rig, forward) == set()
    assert b_blocks_hold_a_prefix(rig, forward)
    assert rig.worker.worker.num_pins() == 0


def test_a_staging_buffer_that_never_comes_back_fails_the_transfer_not_the_engine():
    layout = KVLayout(2, 2, 8, torch.float32)
    staging = StagingArea(layout, 4, torch.device("cpu"), 1, timeout_s=0.05)
    held = staging.acquire()
    assert staging.try_acquire() is None
    with pytest.raises(StagingTimeout):
        staging.acquire()
    assert staging.timeouts == 1
    staging.release(held)
    assert staging.acquire() is held


# ------------------------------------------------------------------ fix 8: lookups

def test_a_lookup_answers_while_the_saver_is_blocked(tmp_path):
    """Scenario: the saver thread is stuck (a job waits on an event). A lookup still answers
    from the tiers' indexes: it returns before the saver is released (before: it waited for
    the saver up to a quarter of the scheduler's deadline, every lookup)."""
    rig = rig_for(tmp_path, LAYOUT, BACKEND)
    save_prompt_a(rig, BACKEND)
    side = rig.worker.worker
    release, started = threading.Event(), threading.Event()

    def stuck() -> None:
        started.set()
        release.wait()
    side.saves.jobs.submit(stuck)
    assert started.wait(30)
    digests = rig.worker.engine.hasher.digests(PROMPT_B, "")
    answers: list = []
    lookup = threading.Thread(target=lambda: answers.append(
        side.lookup(LookupRequest("b", 1, digests, len(PROMPT_B), 0))))
    lookup.start()
    lookup.join(60)  # generous: it must not depend on the saver at all
    returned_first = not lookup.is_alive()
    release.set()
    lookup.join()
    assert returned_first, "the lookup waited for the saver"
    assert answers[0].chunks == 2
    side.release("b", 1)


def test_a_disk_hit_is_pinned_without_a_read_and_loaded_by_the_load(tmp_path):
    """Scenario: A's chunks are only on disk. B's lookup reads no chunk (no disk hit counted,
    nothing promoted to the CPU tier); B's load then reads them and fills B's blocks exactly."""
    rig = rig_for(tmp_path, LAYOUT, BACKEND, local_disk=str(tmp_path / "kv"),
                  max_local_disk_size=0.01, async_load="never")
    forward = save_prompt_a(rig, BACKEND)
    engine = rig.worker.engine
    engine.flush()
    cpu, disk = engine.storage.tiers
    for span in engine.spans(PROMPT_A):
        cpu.remove(span.key)
    disk_hits = engine.metrics.value("tier_hits_total", tier="disk")
    assert rig.connector.get_num_new_matched_tokens(make_request("b", PROMPT_B), 0) == (64, False)
    assert engine.metrics.value("tier_hits_total", tier="disk") == disk_hits
    assert cpu.usage().num_chunks == 0
    rig.connector.scheduler.finished(make_request("b", PROMPT_B), [])  # drop that pin
    zero_caches(rig)
    assert load_b(rig, forward) == set()
    assert b_blocks_hold_a_prefix(rig, forward)
    assert engine.metrics.value("tier_hits_total", tier="disk") > disk_hits


# ------------------------------------------------------------------ fix 6: chunked prefill

def test_a_chunked_prefill_saves_each_steps_whole_chunks_in_that_step(tmp_path):
    """Scenario: vLLM prefills A (100 tokens) 40 tokens a step. Each step saves the whole
    chunks it completed (before: the whole prompt in the last step); the stored KV is A's,
    and B then loads it bit-exactly."""
    rig = rig_for(tmp_path, LAYOUT, BACKEND, max_batched=40)
    forward = FakeForward(rig, BACKEND, {"a": PROMPT_A, "b": PROMPT_B})
    rig.scheduler.add_request(make_request("a", PROMPT_A))
    engine, saves = rig.worker.engine, []
    for _ in range(3):  # 40 + 40 + 20 tokens
        output, _ = step(rig, forward)
        saves.append([(op.start, op.end) for op in output.kv_connector_metadata.saves])
        saves[-1].append(engine.lookup(PROMPT_A))  # held after the step
    assert saves == [[(0, 32), 32], [(32, 64), 64], [(64, 96), 96]]
    stats = rig.stats_payloads
    assert sum(s.get("prefill_step_saved_tokens", 0) for s in stats) == 64
    zero_caches(rig)
    assert load_b(rig, forward) == set()
    assert b_blocks_hold_a_prefix(rig, forward)


# ------------------------------------------------------------------ fix 11: the load probe

def test_the_probe_times_a_load_into_the_registered_caches_and_leaves_them_unchanged(tmp_path):
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from tests.adapters.vllm.rig import allocate, vllm_config
    layout, backend = next((lay, b) for lay, b in LAYOUTS if b == "CPU_ATTN")
    config = vllm_config(tmp_path, layout, False)
    kv_config, caches = allocate(config, backend)
    for cache in caches.values():
        cache.copy_(torch.randn(cache.shape).to(cache.dtype))
    before = {name: cache.clone() for name, cache in caches.items()}
    worker = KVConnectorFactory.create_connector(config, KVConnectorRole.WORKER, kv_config)
    try:
        assert worker.engine.read_speeds() == {}  # nothing timed before the caches exist
        worker.register_kv_caches(caches)
        assert set(worker.engine.read_speeds()) == {"cpu"}
        for name, cache in caches.items():
            assert torch.equal(cache, before[name])
        staging = worker.worker.kv.staging
        assert staging.free() == staging.count and worker.engine.storage.tiers[0].usage() \
            .num_chunks == 0
    finally:
        worker.shutdown()


# ------------------------------------------------------------------ fix 7: leases

def test_a_chunk_stays_leased_until_its_copy_is_done_and_failures_give_everything_back(
        monkeypatch):
    """Scenario: the scatter of a pushed chunk fails. The lease was handed to the pipeline
    (the caller's ``with`` releases nothing), and ``finish`` gives it and the buffer back."""
    def broken(*args, **kwargs):
        raise RuntimeError("scatter failed (injected)")
    monkeypatch.setattr(load_pipeline.kernels, "scatter", broken)
    layout = KVLayout(2, 2, 8, torch.float32)
    tier = CPUTier(1 << 20)
    key = ChunkKey("ns", b"k" * 32)
    kv = torch.randn(layout.shape(CHUNK))
    assert tier.put(key, Chunk(kv))
    views = [SimpleNamespace(k=torch.zeros(1))]  # only its device is read here
    staging = StagingArea(layout, CHUNK, torch.device("cpu"), 2)
    order = StreamOrder(torch.device("cpu"))
    streams = LoadStreams(order.side(), order.side())
    pipeline = LoadPipeline(staging, views, streams, torch.arange(CHUNK), None, staged=True)
    lease = tier.get(key)
    with lease, pytest.raises(RuntimeError, match="injected"):
        pipeline.push(lease, 0, CHUNK, 0)
    assert tier._index[key].pins == 1  # handed over: the with block released nothing
    pipeline.finish()
    assert tier._index[key].pins == 0 and staging.free() == staging.count


def test_on_the_host_a_load_scatters_from_the_tier_buffer_and_gives_the_lease_back():
    """Scenario: a CPU load (no staging). The chunk's KV lands in the blocks, no staging buffer
    is taken, and the lease goes back as soon as its scatter is done; a failed scatter gives
    the lease back too (issue 25: the staging copy moved every byte twice)."""
    layout = KVLayout(2, 2, 8, torch.float32)
    tier = CPUTier(1 << 20)
    key = ChunkKey("ns", b"h" * 32)
    kv = torch.randn(layout.shape(CHUNK))
    assert tier.put(key, Chunk(kv))
    caches = [torch.zeros(CHUNK // 4 + 1, 2, 4, 16) for _ in range(2)]  # blocked, block 4
    views = kernels.paged_kv_layers(caches, kernels.PagedLayout.CPU_BLOCKED, 2, 8)
    staging = StagingArea(layout, CHUNK, torch.device("cpu"), 2)
    order = StreamOrder(torch.device("cpu"))
    slots = torch.arange(4, 4 + CHUNK)  # from block 1
    pipeline = LoadPipeline(staging, views, LoadStreams(order.side(), order.side()), slots,
                            None)
    pipeline.push(tier.get(key), 0, CHUNK, 0)
    assert tier._index[key].pins == 0 and staging.free() == staging.count
    pipeline.finish()
    back = torch.empty_like(kv)
    kernels.gather(views, slots, back)
    assert torch.equal(back, kv)


def test_on_the_host_a_quantized_chunk_is_decoded_straight_into_the_blocks(tmp_path):
    """Scenario: a CPU load of a chunk a disk tier stores as int8. The blocks hold exactly
    what decoding and scattering would write there, tokens [3, CHUNK) of it at the load's
    slots, the decoded chunk is never built, and the tier's buffer goes back."""
    layout = KVLayout(2, 2, 8, torch.float32)
    tier = DiskTier(str(tmp_path), 1 << 24, "ns", False, EngineMetrics().for_tier("disk"),
                    stage=ChunkStage("int8"))
    key = ChunkKey("ns", b"q" * 32)
    assert tier.put(key, Chunk(torch.randn(layout.shape(CHUNK))))
    caches = [torch.zeros(CHUNK // 4 + 1, 2, 4, 16) for _ in range(2)]  # blocked, block 4
    views = kernels.paged_kv_layers(caches, kernels.PagedLayout.CPU_BLOCKED, 2, 8)
    staging = StagingArea(layout, CHUNK, torch.device("cpu"), 2)
    order = StreamOrder(torch.device("cpu"))
    slots = torch.arange(4, 4 + CHUNK - 3)
    pipeline = LoadPipeline(staging, views, LoadStreams(order.side(), order.side()), slots,
                            None)
    lease = tier.get(key)
    chunk = lease.chunk
    pipeline.push(lease, 3, CHUNK, 0)
    pipeline.finish()
    assert chunk._kv is None  # never decoded into a chunk of its own
    expected = [torch.zeros_like(c) for c in caches]
    reference.scatter(chunk.coded.decode()[:, :, 3:], kernels.paged_kv_layers(
        expected, kernels.PagedLayout.CPU_BLOCKED, 2, 8), slots)
    assert all(torch.equal(a, b) for a, b in zip(caches, expected, strict=True))
    assert tier._buffers._count == 1  # the read buffer went back for reuse


def test_the_stage_clock_times_a_hits_lookup_pin_read_scatter_and_the_rest(tmp_path):
    """Scenario: B hits A's chunks. Rank 0's ``StageClock`` (what benchmarks/vllm_ttft.py
    reads per request) moved in every stage, and B's blocks hold the right KV."""
    rig = rig_for(tmp_path, LAYOUT, BACKEND)
    forward = save_prompt_a(rig, BACKEND)
    clock = rig.worker.worker.clock
    before = clock.snapshot()
    zero_caches(rig)
    assert not load_b(rig, forward)
    after = clock.snapshot()
    assert [s for s in STAGES if after[s] <= before[s]] == []
    assert b_blocks_hold_a_prefix(rig, forward)


# ------------------------------------------------------------------ fix 1: stream order

def test_a_background_load_orders_after_the_stream_current_when_it_was_planned(tmp_path):
    """Scenario (async_load=always): the event the loader's copies wait for is marked on
    vLLM's thread when the load is handed over, not later on the loader's thread."""
    rig = rig_for(tmp_path, LAYOUT, BACKEND, async_load="always")
    forward = save_prompt_a(rig, BACKEND)
    side = rig.worker.worker
    marks: list[str] = []

    class Recording(StreamOrder):  # CUDA events cannot exist here: record who marks, when
        def mark(self):
            marks.append(threading.current_thread().name)
            return super().mark()
    side.kv.order = Recording(torch.device("cpu"))
    zero_caches(rig)
    rig.scheduler.add_request(make_request("b", PROMPT_B))
    step(rig, forward)  # the load runs in the background
    assert marks and marks[0] == threading.current_thread().name
    step(rig, forward)  # B runs on its loaded KV
    assert b_blocks_hold_a_prefix(rig, forward)
