"""The scheduler's lookups across real process boundaries: two worker processes (ranks 0 and 1),
each with its own engine and the connector's worker side, answering over ZMQ IPC. A stalled rank
(SIGSTOP) is a miss within the timeout, said loudly once, skipped during the back-off, and hits
resume once it answers again. Bad messages are misses, never a dead server."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
import zmq

from lmcache_ext.adapters.vllm.channel import AllRanksClient, LookupRequest, socket_path
from lmcache_ext.chunk import KVLayout
from lmcache_ext.config import load_config
from lmcache_ext.engine import key_namespace
from lmcache_ext.keys import PrefixHasher

CHUNK = 16
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)
TOKENS = list(range(100, 164))  # 4 chunks
RANK_SCRIPT = """
import json, sys, torch
from lmcache_ext.adapters.vllm.worker import WorkerSide
from lmcache_ext.config import load_config
from lmcache_ext.chunk import KVLayout
from lmcache_ext.engine import CacheEngine
key, rank, chunk, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
config = load_config(env={}, overrides={"chunk_size": chunk, "max_local_cpu_size": 0.01})
layout = KVLayout(2, 2, 8, torch.float32)
engine = CacheEngine(config, layout, "m", rank, 2)
engine.store(tokens, torch.randn(layout.shape(len(tokens))))
engine.probe_read_speeds()  # no vLLM caches registered here (that probes a real load)
side = WorkerSide(engine, 16, key, rank)
print("ready", flush=True)
sys.stdin.read()  # serve until the test closes stdin
side.close()
"""


@pytest.fixture(scope="module")
def two_ranks():
    """Rank 0 holds 3 chunks of TOKENS, rank 1 holds 2; yields (engine key, processes).
    Shared by the tests (each starts vLLM's imports in two processes): each leaves them
    running and answering."""
    key = f"test-{uuid.uuid4()}"
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, key, str(rank), str(CHUNK),
                               json.dumps(TOKENS[:held])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
             for rank, held in ((0, 48), (1, 32))]
    try:
        for proc in procs:  # vLLM may log to stdout before the script says it is ready
            assert any(line.strip() == "ready" for line in proc.stdout), "a rank died at start"
        yield key, procs
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGCONT)
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def digests() -> list[bytes]:
    config = load_config(env={}, overrides={"chunk_size": CHUNK})
    return PrefixHasher(key_namespace(config, LAYOUT, "m", 0, 2)).digests(TOKENS)


def lookup(caches: AllRanksClient, pin_id: int, first: int = 0) -> int:
    return caches.lookup(LookupRequest(f"req-{pin_id}", pin_id, digests(), len(TOKENS),
                                       first)).chunks


def test_the_hit_is_what_every_rank_holds(two_ranks):
    key, _ = two_ranks
    caches = AllRanksClient(key, 2, timeout_s=5.0, backoff_s=1.0)
    assert lookup(caches, 1) == 2  # rank 0 holds 3 chunks, rank 1 holds 2
    assert lookup(caches, 2, first=1) == 2
    # Each answer says how long its chunks take to load (the ranks' probed CPU tier).
    answer = caches.lookup(LookupRequest("req-t", 9, digests(), len(TOKENS), 0))
    assert answer.chunks == 2 and len(answer.load_s) == 2
    assert all(0 < seconds < 1 for seconds in answer.load_s)
    assert caches.timeouts == 0
    caches.close()


def test_a_stalled_rank_is_a_quick_miss_said_once_and_hits_resume(two_ranks, caplog):
    """Scenario: rank 1's process is stopped (SIGSTOP) mid-run: lookups miss within the
    timeout, then skip it at once during the back-off; continued, it hits again."""
    key, procs = two_ranks
    caches = AllRanksClient(key, 2, timeout_s=0.5, backoff_s=1.0)
    assert lookup(caches, 1) == 2
    os.kill(procs[1].pid, signal.SIGSTOP)
    with caplog.at_level(logging.INFO, logger="lmcache_ext.adapters.vllm.channel"):
        began = time.monotonic()
        assert lookup(caches, 2) == 0
        assert time.monotonic() - began < 2.0
        began = time.monotonic()
        assert lookup(caches, 3) == 0  # backing off: no wait at all
        assert time.monotonic() - began < 0.2
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "cannot reach the KV cache of worker rank 1" in \
            errors[0].getMessage()
        os.kill(procs[1].pid, signal.SIGCONT)
        time.sleep(1.1)
        assert lookup(caches, 4) == 2
        assert any("answers again" in r.getMessage() for r in caplog.records)
    assert caches.timeouts == 2
    caches.close()


def test_malformed_messages_are_misses_and_the_rank_keeps_serving(two_ranks):
    key, _ = two_ranks
    context = zmq.Context()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(socket_path(key, 0))
    bad = [[b"not json"], [json.dumps({"id": 7, "op": "lookup"}).encode()],
           [json.dumps({"id": 8, "op": "lookup", "req": "x", "pin": 1, "tokens": 64,
                        "first": 0, "size": 32}).encode(), b"\x00" * 33],
           [json.dumps({"id": 9, "op": "explode"}).encode()]]
    for frames in bad:
        raw.send_multipart(frames)
        assert raw.poll(5000), "the rank stopped answering"
        assert json.loads(raw.recv())["chunks"] == 0
    raw.close()
    context.term()
    caches = AllRanksClient(key, 2, timeout_s=5.0, backoff_s=1.0)
    assert lookup(caches, 1) == 2
    caches.close()
