"""Saves off the step: the worker copies a save's KV out of vLLM's blocks in the step and the
tiers' writes run on the saver thread; bounded, in order, failures counted."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lmcache_ext.adapters.vllm.background import BackgroundJobs
from tests.adapters.vllm.rig import make_request
from tests.adapters.vllm.test_connector import (
    LAYOUTS,
    PROMPT_A,
    FakeForward,
    expected_kv,
    rig_for,
)

PUT_S = 0.5  # a deliberately slow CPU tier: each chunk write takes this long


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
    rig.scheduler.add_request(make_request("a", PROMPT_A))
    output = rig.scheduler.schedule()
    rig.worker.bind_connector_metadata(output.kv_connector_metadata)
    rig.worker.start_load_kv(None)
    FakeForward(rig, backend, {"a": PROMPT_A})(output)
    began = time.perf_counter()
    rig.worker.wait_for_save()
    in_step = time.perf_counter() - began
    rig.worker.clear_connector_metadata()
    assert in_step < PUT_S, f"the step waited {in_step:.3f} s for the tier"
    assert engine.lookup(PROMPT_A) < 96  # still being written
    rig.worker.worker.saves.jobs.join()
    assert engine.lookup(PROMPT_A) == 96
    stored = torch.zeros(engine.layout.shape(96), dtype=engine.layout.dtype)
    assert engine.retrieve(PROMPT_A, stored) == 96
    want = expected_kv(PROMPT_A, range(96)).permute(1, 2, 0, 3, 4)
    assert torch.equal(stored.view(torch.int16), want.view(torch.int16))


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
