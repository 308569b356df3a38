"""SageMaker stateful sessions as an application uses them (boto3 and the SDK): create with
``SessionId="NEW_SESSION"``, turns with the id, close; a closed, unknown or expired id is a
``ModelError`` carrying the container's refusal (400 from the built-in server, 424 from LMI:
``Target.refusal_status``)."""

from __future__ import annotations

import re
import time

import pytest
from botocore.exceptions import ClientError

from sagemaker_tests.test_endpoint import model_error, needs_streaming

SYSTEM = ("You answer questions about the KV cache of a language model server. Keep answers "
          "short and exact. ") * 5  # ~560 tokens on the local model: two full chunks
QUESTION = "how many bytes does one token of the KV cache take, for each layer and head? " * 2
EXPIRES = re.compile(r"^[A-Za-z0-9_-]+; Expires=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def create(client):
    answer = client.invoke({"requestType": "NEW_SESSION"}, session_id="NEW_SESSION")
    assert answer.new_session and EXPIRES.match(answer.new_session), answer.new_session
    return answer.session_id


def turn(client, session_id: str, history: list[dict], question: str) -> dict:
    history.append({"role": "user", "content": question})
    answer = client.invoke({"messages": history, "max_tokens": 4, "temperature": 0},
                           session_id=session_id)
    reply = answer.json()
    history.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
    return {"reply": reply, "replica": answer.replica}


def test_a_conversation_stays_on_one_instance_and_keeps_hitting(client, target):
    """Scenario: a four-turn chat in one session. Every turn is served by the instance that
    created the session (where the endpoint names it), and from turn two on the conversation so
    far comes from the cache (where the endpoint reports cached tokens)."""
    session_id = create(client)
    history = [{"role": "system", "content": f"({client.name}) {SYSTEM}"}]
    turns = [turn(client, session_id, history, f"Question {n}: {QUESTION}") for n in range(1, 5)]
    replicas = {t["replica"] for t in turns}
    assert len(replicas) == 1, replicas
    if target.reports_cached_tokens:
        cached = [t["reply"]["usage"]["prompt_tokens_details"]["cached_tokens"] for t in turns]
        prompts = [t["reply"]["usage"]["prompt_tokens"] for t in turns]
        print(f"cached tokens per turn {cached} of {prompts}")
        assert cached[0] == 0, cached  # this conversation is new to the endpoint
        assert all(c >= target.chunk_tokens * 2 for c in cached[1:]), cached
        assert cached[-1] > cached[1], cached  # the history grows and keeps being found
    close = client.invoke({"requestType": "CLOSE"}, session_id=session_id)
    assert close.closed_session == session_id


def test_a_closed_session_is_gone(client, target):
    session_id = create(client)
    assert client.invoke({"requestType": "CLOSE"}, session_id=session_id).closed_session == \
        session_id
    with pytest.raises(ClientError) as caught:
        turn(client, session_id, [], "still there?")
    status, message = model_error(caught)
    assert status == target.refusal_status and "session" in message.lower(), message


def test_an_unknown_session_id_is_a_model_error(client, target):
    with pytest.raises(ClientError) as caught:
        turn(client, "0123456789abcdef0123456789abcdef", [], "hello?")
    status, message = model_error(caught)
    assert status == target.refusal_status and "session" in message.lower(), message


def test_an_expired_session_is_a_model_error_400(boto3_client, target):
    """Scenario: a session left idle past its expiry (the local endpoint's is a few seconds)."""
    if target.local is None:
        pytest.skip("LMI serves a request naming an expired session without the session "
                    "(djl-serving 7e13b08, session_manager.py lines 120-124): no error to see")
    session_id = create(boto3_client)
    turn(boto3_client, session_id, [], "first")
    time.sleep(target.local.session_expiry_s + 1.5)
    with pytest.raises(ClientError) as caught:
        turn(boto3_client, session_id, [], "too late?")
    status, message = model_error(caught)
    assert status == 400 and "expired" in message


def test_a_streamed_turn_in_a_session(boto3_client, target):
    """A session is created with InvokeEndpoint; its turns may stream."""
    needs_streaming(target)
    client = boto3_client
    session_id = create(client)
    answer = client.stream({"messages": [{"role": "user", "content": "stream in a session"}],
                            "max_tokens": 4, "temperature": 0, "stream": True},
                           session_id=session_id)
    assert answer.body.count(b"\n") >= 2
    client.invoke({"requestType": "CLOSE"}, session_id=session_id)
