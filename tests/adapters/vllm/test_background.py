"""Saves off the step: the worker copies a save's KV out of vLLM's blocks in the step and the
tiers' writes run on the saver thread; bounded, in order, failures counted."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmcache_ext.adapters.vllm import worker_saves
from lmcache_ext.adapters.vllm.background import BackgroundJobs
from lmcache_ext.testing.redis_server import RedisServer, redis_server_binary
from lmcache_ext.testing.slow_proxy import SlowProxy
from tests.adapters.vllm.rig import make_request
from tests.adapters.vllm.test_connector import (
    LAYOUTS,
    PROMPT_A,
    FakeForward,
    expected_kv,
    rig_for,
)

PUT_S = 0.5  # a deliberately slow tier: each CPU-tier write, or each Redis call, takes this long
SLOW_BUT_ANSWERING_S = 10.0  # remote_timeout_s: a slow Redis, never a timed-out one (1 s, the
# default, is within a loaded machine's reach of a 0.5 s call: the lookup then missed)


def save_a_in_one_step(rig, backend: str) -> float:
    """A's 3 chunks saved in one step, as vLLM's model runner drives it; the seconds the step
    spent in ``wait_for_save`` (the tiers' writes may still be running after it)."""
    rig.scheduler.add_request(make_request("a", PROMPT_A))
    output = rig.scheduler.schedule()
    rig.worker.bind_connector_metadata(output.kv_connector_metadata)
    rig.worker.start_load_kv(None)
    FakeForward(rig, backend, {"a": PROMPT_A})(output)
    began = time.perf_counter()
    rig.worker.wait_for_save()
    in_step = time.perf_counter() - began
    rig.worker.clear_connector_metadata()
    return in_step


def saved_a_in_one_step(rig, backend: str) -> tuple[float, dict]:
    """``save_a_in_one_step``, then its writes done: the step's seconds and the worker's
    figures."""
    in_step = save_a_in_one_step(rig, backend)
    rig.worker.worker.saves.jobs.join()
    return in_step, rig.worker.get_kv_connector_stats().data


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_the_step_waits_for_the_copy_out_only(tmp_path, layout, backend, monkeypatch):
    """Scenario: A's 3 chunks go to a tier that takes 0.5 s a write. wait_for_save (in the
    step) returns before the first write could have finished (synchronous saves took 1.5 s);
    the chunks land afterwards, bit-exact."""
    rig = rig_for(tmp_path, layout, backend)
    engine = rig.worker.engine
    tier = engine.storage.tiers[0]
    real_put = tier.put

    def slow_put(key, chunk):
        time.sleep(PUT_S)
        return real_put(key, chunk)
    monkeypatch.setattr(tier, "put", slow_put)
    in_step = save_a_in_one_step(rig, backend)
    assert in_step < PUT_S, f"the step waited {in_step:.3f} s for the tier"
    assert engine.lookup(PROMPT_A) < 96  # still being written
    rig.worker.worker.saves.jobs.join()
    assert engine.lookup(PROMPT_A) == 96
    stored = torch.zeros(engine.layout.shape(96), dtype=engine.layout.dtype)
    assert engine.retrieve(PROMPT_A, stored) == 96
    want = expected_kv(PROMPT_A, range(96)).permute(1, 2, 0, 3, 4)
    assert torch.equal(stored.view(torch.int16), want.view(torch.int16))


@pytest.fixture
def slow_redis_url(tmp_path):
    """A real redis-server behind a link that holds each call ``PUT_S``."""
    redis_server_binary()  # a missing redis-server fails with the fix, never a skip
    server = RedisServer(tmp_path / "redis").start()
    link = SlowProxy("127.0.0.1", server.port, PUT_S).start()
    yield link.url()
    link.stop()
    server.stop()


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_a_slow_redis_alone_costs_the_step_a_bounded_wait_then_skipped_chunks(
        tmp_path, layout, backend, slow_redis_url):
    """Scenario: the only tier is Redis, each call held 0.5 s, one staging buffer. A's first
    chunk goes to the saver; the next finds the buffer still being written, the step waits
    IO_TIER_WAIT_S and saves no more: 64 tokens skipped and counted, the first chunk stored
    (it used to wait out each write: over a second in the step)."""
    rig = rig_for(tmp_path, layout, backend, local_cpu=False, remote_url=slow_redis_url,
                  remote_timeout_s=SLOW_BUT_ANSWERING_S, staging_chunks=1)
    in_step, figures = saved_a_in_one_step(rig, backend)
    assert figures.get("skipped_save_tokens") == 64, figures
    assert rig.worker.engine.lookup(PROMPT_A) == 32
    assert in_step < PUT_S, f"the step waited {in_step:.3f} s for Redis"
    print(f"\nthe step's save: {in_step * 1000:.0f} ms (bound "
          f"{worker_saves.IO_TIER_WAIT_S * 1000:.0f} ms of waiting; a Redis call takes "
          f"{PUT_S * 1000:.0f} ms)")


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_a_disk_alone_that_keeps_writing_gets_every_chunk_however_long_the_whole_save(
        tmp_path, layout, backend, monkeypatch):
    """Scenario: the only tier is a disk whose writes take 0.13 s each, one staging buffer, a
    buffer's wait 0.2 s. Each buffer comes back within its wait, so all 3 chunks are saved
    though the save takes 0.26 s (a bound on the whole save skipped the last chunk, and on a
    healthy disk 3 of a 4K prompt's 4 chunks: 16 writes outlast 50 ms)."""
    monkeypatch.setattr(worker_saves, "IO_TIER_WAIT_S", 0.2)
    rig = rig_for(tmp_path, layout, backend, local_cpu=False,
                  local_disk=str(tmp_path / "kv"), max_local_disk_size=0.1, staging_chunks=1)
    tier = rig.worker.engine.storage.tiers[0]
    assert tier.name == "disk"
    real_put = tier.put

    def paced_put(key, chunk):
        time.sleep(0.13)
        return real_put(key, chunk)
    monkeypatch.setattr(tier, "put", paced_put)
    in_step, figures = saved_a_in_one_step(rig, backend)
    assert "skipped_save_tokens" not in figures, figures
    assert rig.worker.engine.lookup(PROMPT_A) == 96
    assert in_step > 0.2  # it did wait past one buffer's bound, at the disk's pace


@pytest.mark.parametrize(("layout", "backend"), LAYOUTS[:1])
def test_with_the_cpu_tier_in_front_the_step_waits_for_buffers_and_saves_every_chunk(
        tmp_path, layout, backend, slow_redis_url):
    """Scenario: as above with the CPU tier in front (the default): the saver's writes are RAM's,
    the step waits for the buffer between chunks and all 96 tokens are saved; Redis gets them
    behind it."""
    rig = rig_for(tmp_path, layout, backend, remote_url=slow_redis_url,
                  remote_timeout_s=SLOW_BUT_ANSWERING_S, staging_chunks=1)
    _, figures = saved_a_in_one_step(rig, backend)
    assert "skipped_save_tokens" not in figures, figures
    assert rig.worker.engine.lookup(PROMPT_A) == 96


def test_a_full_queue_makes_the_caller_wait_and_jobs_run_in_order():
    failures: list[int] = []
    saver = BackgroundJobs("test-saver", 1, lambda: failures.append(1))
    gate, done = threading.Event(), []
    saver.submit(gate.wait)  # the thread is busy with this one
    assert not saver.wait_idle(0.05)  # a lookup waits this long at most, then answers
    saver.submit(lambda: done.append(1))  # queued
    threading.Timer(0.1, gate.set).start()
    saver.submit(lambda: done.append(2))  # the queue is full: waits for room
    saver.submit(lambda: 1 / 0)  # a failing save is counted, never raised here
    saver.join()
    assert saver.wait_idle(0.0)
    assert done == [1, 2] and saver.waits >= 1 and failures == [1]
    saver.close()
    saver.close()  # idempotent
