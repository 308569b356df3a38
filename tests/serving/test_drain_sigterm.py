"""Drain on SIGTERM, end to end with real processes: ``lmcache-ext route`` in front of two
built-in replicas (the container entrypoint -> ``lmcache-ext serve``) and a redis-server
(``lmcache_ext.testing.local_sagemaker``). The replica holding a conversation's session gets
SIGTERM: it writes the session's pinned chunks to Redis and exits 0; the conversation's next
turn, re-created on the other replica by the client, loads its history from Redis. And a server
with sessions but no shared tier says so once at start."""

from __future__ import annotations

import logging
import re

import pytest
import redis

from lmcache_ext.client import HttpTransport, SessionClient
from lmcache_ext.client.chat import ChatParams
from lmcache_ext.config import load_config
from lmcache_ext.serving.app import build_endpoint
from lmcache_ext.testing.local_sagemaker import LocalSageMaker
from lmcache_ext.testing.redis_server import redis_server_binary
from lmcache_ext.testing.tiny_model import build_tiny_model

CHUNK = 256  # the seed's CPU config, which the local endpoint's replicas load
SYSTEM = "You answer from the returns policy, briefly and politely. " * 12  # ~700 tokens


@pytest.fixture
def endpoint(tmp_path):
    redis_server_binary()  # a missing redis-server fails with the fix, never a skip
    model = build_tiny_model(tmp_path / "model", max_context=4096)
    local = LocalSageMaker(tmp_path, model, replicas=2,
                           extra_env={"OPTION_LMCACHE_COST_AWARE_RETRIEVAL": "false"}).start()
    yield local
    local.close()


def replica_of(local: LocalSageMaker, session_id: str) -> int:
    """The index of the replica that created ``session_id`` (its log says so)."""
    for index in range(local.replicas):
        if f"session {session_id} created" in local.log(index):
            return index
    raise AssertionError(f"no replica created session {session_id}")


def test_sigterm_drains_the_session_and_its_next_turn_elsewhere_loads_the_history(endpoint):
    """Scenario: scale-in of the replica holding a conversation; what was written behind to
    Redis is gone (flushed), so only the drain can hand the history over."""
    client = SessionClient(HttpTransport(endpoint.url, timeout_s=120), system_prompt=SYSTEM,
                           params=ChatParams(max_tokens=4))
    client.turn("c1", "Can I return a book without a receipt?")
    second = client.turn("c1", "And a gift card?")
    assert second.prompt_tokens > 2 * CHUNK
    index = replica_of(endpoint, second.session_id)
    redis.Redis.from_url(endpoint.redis.url).flushall()

    process = endpoint.processes[index]
    process.terminate()  # SIGTERM, as SageMaker's scale-in and docker stop send
    assert process.wait(timeout=60) == 0
    log = endpoint.log(index)
    drained = re.search(r"drain complete in [\d.]+ s: 1 session\(s\), (\d+) pinned chunk\(s\) "
                        r"written to the shared tier", log)
    assert drained is not None and int(drained.group(1)) >= 2, log[-3000:]

    third = client.turn("c1", "Thanks!")
    assert third.recreated and third.session_id != second.session_id
    assert replica_of(endpoint, third.session_id) != index
    assert third.cached_tokens >= second.prompt_tokens // CHUNK * CHUNK


def test_sessions_without_a_shared_tier_are_said_once_at_start(tmp_path, caplog):
    model = build_tiny_model(tmp_path / "model")
    config = load_config(env={}, overrides={"max_local_cpu_size": 0.05})
    with caplog.at_level(logging.WARNING):
        endpoint = build_endpoint(config, str(model), "127.0.0.1", 0)
    try:
        notes = [r for r in caplog.records if "without a shared tier" in r.getMessage()]
        assert len(notes) == 1
    finally:
        endpoint.server.server_close()
        endpoint.service.sessions.close()
        endpoint.engine.close()
