"""SessionClient over real HTTP (and boto3) against real session-speaking replicas behind the
router: sessions made on first use, replaced when gone, closed; many threads at once."""

from __future__ import annotations

import threading

import pytest

from lmcache_ext.client import (
    EndpointError,
    HttpTransport,
    SageMakerTransport,
    SessionClient,
)
from lmcache_ext.sessions.protocol import CLOSE, NEW_SESSION
from tests.routing.conftest import runtime, start_router


def replica_of(replicas, session_id: str):
    return next(r for r in replicas if session_id in r.open_sessions())


def creates(replicas) -> int:
    return sum(1 for r in replicas for s in r.seen if s.session == NEW_SESSION)


def verify_history(client: SessionClient, conversation: str, turns: int) -> None:
    """System prompt, then user/assistant pairs in order; each answer counted the messages."""
    history = client.history(conversation)
    assert history[0]["role"] == "system" and len(history) == 1 + 2 * turns
    for index in range(turns):
        user, assistant = history[1 + 2 * index], history[2 + 2 * index]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"].endswith(f":{2 + 2 * index}")  # messages sent that turn


@pytest.fixture(params=["http", "boto3"])
def client(request, replicas):
    router = start_router(replicas)
    transport = HttpTransport(router.url) if request.param == "http" else \
        SageMakerTransport("local", client=runtime(router.url))
    yield SessionClient(transport, system_prompt="You are terse.")
    router.close()


def test_session_created_on_first_use_and_kept(client, replicas):
    first = client.turn("c1", "hello")
    assert creates(replicas) == 1 and not first.recreated
    for text in ("and?", "more"):
        assert client.turn("c1", text).session_id == first.session_id
    assert creates(replicas) == 1 and client.sessions_created("c1") == 1
    owner = replica_of(replicas, first.session_id)
    assert len(owner.inferences()) == 3
    verify_history(client, "c1", 3)


def test_expired_session_is_replaced_and_the_conversation_continues(client, replicas):
    """Scenario: the replica expires the session between turns; the next turn succeeds on a
    new session with the whole history, and says it was re-created."""
    first = client.turn("c1", "hello")
    replica_of(replicas, first.session_id).expire(first.session_id)
    second = client.turn("c1", "still there?")
    assert second.recreated and second.session_id != first.session_id
    assert second.text.endswith(":4") and client.sessions_created("c1") == 2
    verify_history(client, "c1", 2)


def test_unknown_session_is_replaced(replicas):
    """Scenario: the conversation's endpoint changes to one that never saw its session."""
    client = SessionClient(HttpTransport(replicas[0].url), system_prompt="s")
    first = client.turn("c1", "hello")
    client.transport = HttpTransport(replicas[1].url)
    second = client.turn("c1", "again")
    assert second.recreated and second.session_id in replicas[1].open_sessions()
    assert first.session_id in replicas[0].open_sessions()
    verify_history(client, "c1", 2)


def test_close_ends_the_session_on_its_replica(client, replicas):
    turn = client.turn("c1", "hello")
    owner = replica_of(replicas, turn.session_id)
    assert client.close("c1") is True
    assert turn.session_id not in owner.open_sessions()
    closes = [s for s in owner.seen if s.body.get("requestType") == CLOSE]
    assert [s.session for s in closes] == [turn.session_id]
    assert client.close("c1") is False


def test_close_of_a_session_already_gone_is_quiet(client, replicas):
    turn = client.turn("c1", "hello")
    replica_of(replicas, turn.session_id).expire(turn.session_id)
    assert client.close("c1") is True


def test_streamed_turns_keep_the_session_and_history(client, replicas):
    stream = client.stream_turn("c1", "hello")
    pieces = list(stream)
    assert len(pieces) == 2 and stream.result is not None
    assert "".join(pieces) == stream.result.text and stream.result.text.endswith(":2")
    again = client.stream_turn("c1", "more")
    assert "".join(again).endswith(":4")
    assert again.result.session_id == stream.result.session_id
    assert creates(replicas) == 1
    verify_history(client, "c1", 2)


def test_streamed_turn_after_expiry_is_recreated(client, replicas):
    first = client.turn("c1", "hello")
    replica_of(replicas, first.session_id).expire(first.session_id)
    stream = client.stream_turn("c1", "more")
    assert "".join(stream).endswith(":4") and stream.result.recreated


def test_many_threads_many_conversations(replicas):
    """Scenario: 12 threads share one client; conversations c0..c5 each get turns from two
    threads at once. Each conversation ends with one session and a consistent history."""
    router = start_router(replicas)
    client = SessionClient(HttpTransport(router.url), system_prompt="s")
    errors: list[BaseException] = []

    def talk(conversation: str) -> None:
        try:
            for turn in range(4):
                client.turn(conversation, f"turn {turn}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=talk, args=(f"c{i % 6}",)) for i in range(12)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        for index in range(6):
            assert client.sessions_created(f"c{index}") == 1
            verify_history(client, f"c{index}", 8)
        assert creates(replicas) == 6
        client.close_all()
        assert all(not r.open_sessions() for r in replicas)
    finally:
        router.close()


def test_an_endpoint_without_sessions_is_a_clear_error(tmp_path):
    """A create answered without a session id names the likely cause."""
    from lmcache_ext.testing.session_replica import SessionReplica

    class NoSessions(SessionReplica):
        def answer(self, session, body):
            return 200, {}, {}

    replica = NoSessions("plain").start()
    try:
        with pytest.raises(EndpointError, match="stateful sessions enabled"):
            SessionClient(HttpTransport(replica.url)).turn("c1", "hello")
    finally:
        replica.close()


def test_without_sessions_the_history_still_grows(replicas):
    client = SessionClient(HttpTransport(replicas[0].url), system_prompt="s", sessions=False)
    for text in ("a", "b", "c"):
        assert client.turn("c1", text).session_id is None
    assert creates(replicas) == 0 and all(s.session is None for s in replicas[0].seen)
    verify_history(client, "c1", 3)
