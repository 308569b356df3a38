"""The client and the router against real built-in replicas (tiny model) that speak sessions:
over plain HTTP and through boto3, a conversation stays on one replica and hits its cache;
expiry (the replicas' session clock moved past it) is replaced without the caller noticing."""

from __future__ import annotations

import pytest

from lmcache_ext.client import (
    EndpointError,
    HttpTransport,
    SageMakerTransport,
    SessionClient,
)
from lmcache_ext.client.chat import ChatParams
from lmcache_ext.config import load_config
from lmcache_ext.routing.replicas import start_replicas
from lmcache_ext.sessions.store import SessionState
from tests.routing.conftest import runtime, start_router

EXPIRY_S = 60.0
SYSTEM = "You answer from the policy. " * 8  # 224 bytes: 7 chunks of 32 in the byte tokenizer


class Clock:
    """The replicas' session time: real time plus an offset a test moves forward."""

    def __init__(self) -> None:
        import time

        self._time = time.time
        self.offset = 0.0

    def __call__(self) -> float:
        return self._time() + self.offset


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def engines(tiny_model, clock):
    # Loads always (the tiny model recomputes so fast the cost model may skip a load).
    config = load_config(env={}, overrides={"chunk_size": 32, "max_local_cpu_size": 0.05,
                                            "cost_aware_retrieval": False,
                                            "sessions_expiration_s": EXPIRY_S})
    replicas = start_replicas(3, config, loaded=tiny_model, session_clock=clock)
    yield replicas
    replicas.close()


@pytest.fixture(params=["http", "boto3"])
def client(request, engines):
    router = start_router(engines.backends)
    transport = HttpTransport(router.url) if request.param == "http" else \
        SageMakerTransport("local", client=runtime(router.url))
    yield SessionClient(transport, system_prompt=SYSTEM, params=ChatParams(max_tokens=4))
    router.close()


def holders(engines, session_id: str) -> list[int]:
    """Indexes of the replicas where ``session_id`` is open."""
    return [index for index, endpoint in enumerate(engines.endpoints)
            if endpoint.service.sessions.store.state(session_id) is SessionState.OPEN]


def test_a_conversation_stays_on_one_replica_and_hits(client, engines):
    turns = [client.turn("c1", f"Question {i}: may I return it after {i} days?")
             for i in range(3)]
    assert len({t.session_id for t in turns}) == 1
    assert len(holders(engines, turns[0].session_id)) == 1
    for before, after in zip(turns, turns[1:], strict=False):
        assert after.cached_tokens >= before.prompt_tokens // 32 * 32 > 0
    streamed = client.stream_turn("c1", "And with a receipt?")
    assert "".join(streamed) == streamed.result.text
    assert streamed.result.session_id == turns[0].session_id
    assert streamed.result.cached_tokens >= turns[-1].prompt_tokens // 32 * 32
    client.close("c1")
    assert holders(engines, turns[0].session_id) == []


def test_an_expired_session_is_replaced_and_the_conversation_continues(client, engines,
                                                                       clock):
    first = client.turn("c2", "Can I return shoes?")
    clock.offset += EXPIRY_S + 1  # the replicas' sessions expire; nothing else changes
    second = client.turn("c2", "What about boots?")
    assert second.recreated and second.session_id != first.session_id
    assert holders(engines, second.session_id) and not holders(engines, first.session_id)
    assert [m["role"] for m in client.history("c2")] == \
        ["system", "user", "assistant", "user", "assistant"]
    client.close("c2")


def test_sessions_off_is_a_clear_error_not_a_loop(tiny_model):
    config = load_config(env={}, overrides={"chunk_size": 32, "max_local_cpu_size": 0.05,
                                            "enable_stateful_sessions": False})
    replicas = start_replicas(1, config, loaded=tiny_model)
    try:
        with pytest.raises(EndpointError, match="not enabled") as caught:
            SessionClient(HttpTransport(replicas.endpoints[0].url)).turn("c", "hello")
        assert caught.value.status == 400
    finally:
        replicas.close()
