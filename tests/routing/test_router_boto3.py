"""boto3's own sagemaker-runtime client against the router (endpoint_url, fake credentials):
botocore's parsers judge the session headers, the event stream and the error shapes."""

from __future__ import annotations

import json
import socket
import threading

import pytest
from botocore.exceptions import ClientError, EventStreamError

from lmcache_ext.routing.policy import make_policy
from lmcache_ext.routing.router import Backend, Router
from lmcache_ext.sessions.protocol import NEW_SESSION, parse_new_session
from lmcache_ext.testing.session_replica import SessionReplica
from tests.routing.conftest import closed_port, post, runtime, start_router


def invoke(client, payload: dict, **kwargs) -> dict:
    return client.invoke_endpoint(EndpointName="local", Body=json.dumps(payload),
                                  ContentType="application/json", **kwargs)


def served_by(reply: dict) -> str:
    return reply["ResponseMetadata"]["HTTPHeaders"]["x-lmcache-ext-replica"]


def test_session_lifecycle_through_boto3(replicas, router):
    """Scenario: create (NewSessionId), 3 turns on the creating replica, close
    (ClosedSessionId), then the closed id is a ModelError carrying the replica's 400."""
    client = runtime(router.url)
    created = invoke(client, {"requestType": "NEW_SESSION"}, SessionId=NEW_SESSION)
    session_id, expires_at = parse_new_session(created["NewSessionId"])
    assert expires_at is not None
    for turn in range(3):
        reply = invoke(client, {"messages": [{"role": "user", "content": f"t{turn}"}]},
                       SessionId=session_id)
        assert served_by(reply) == served_by(created)
        assert json.loads(reply["Body"].read())["choices"][0]["message"]["content"] == \
            f"{served_by(created)}:1"
    closed = invoke(client, {"requestType": "CLOSE"}, SessionId=session_id)
    assert closed["ClosedSessionId"] == session_id
    with pytest.raises(ClientError) as caught:
        invoke(client, {"messages": [{"role": "user", "content": "again"}]},
               SessionId=session_id)
    error = caught.value.response
    assert error["Error"]["Code"] == "ModelError"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert error["OriginalStatusCode"] == 400 and "unknown" in error["OriginalMessage"]


def test_a_create_answered_as_lmi_answers_it_gives_boto3_a_new_session_id():
    """LMI names a new session only in X-Amzn-SageMaker-Session-Id (djl_python/session_utils.py
    lines 37-40 at djl-serving 7e13b08); SageMaker hands that to the client as NewSessionId,
    and the session's turns go to the replica that created it."""
    lmi_replicas = [SessionReplica(f"lmi{i}", lmi_headers=True).start() for i in range(3)]
    router = start_router(lmi_replicas)
    try:
        direct = post(lmi_replicas[0].url, {"requestType": "NEW_SESSION"},
                      {"X-Amzn-SageMaker-Session-Id": NEW_SESSION})
        assert "x-amzn-sagemaker-new-session-id" not in direct.headers  # as LMI answers
        assert "expires=" in direct.headers["x-amzn-sagemaker-session-id"].lower()
        client = runtime(router.url)
        created = invoke(client, {"requestType": "NEW_SESSION"}, SessionId=NEW_SESSION)
        session_id, expires_at = parse_new_session(created["NewSessionId"])
        assert expires_at is not None
        for turn in range(4):
            reply = invoke(client, {"messages": [{"role": "user", "content": f"t{turn}"}]},
                           SessionId=session_id)
            assert served_by(reply) == served_by(created)
        closed = invoke(client, {"requestType": "CLOSE"}, SessionId=session_id)
        assert closed["ClosedSessionId"] == session_id
    finally:
        router.close()
        for replica in lmi_replicas:
            replica.close()


def test_streaming_with_a_session_through_boto3(router):
    client = runtime(router.url)
    created = invoke(client, {"requestType": "NEW_SESSION"}, SessionId=NEW_SESSION)
    session_id, _ = parse_new_session(created["NewSessionId"])
    reply = client.invoke_endpoint_with_response_stream(
        EndpointName="local", ContentType="application/json", SessionId=session_id,
        Body=json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}))
    assert reply["ContentType"] == "application/jsonlines"
    parts = b"".join(event["PayloadPart"]["Bytes"] for event in reply["Body"])
    lines = [json.loads(line) for line in parts.splitlines()]
    assert "".join(line["choices"][0]["delta"]["content"] for line in lines) == \
        f"{served_by(created)}:1"
    assert served_by(reply) == served_by(created)


def test_custom_attributes_pass_through_boto3(router):
    reply = invoke(runtime(router.url), {"messages": [{"role": "user", "content": "x"}]},
                   CustomAttributes="tenant=7")
    assert reply["CustomAttributes"] == "tenant=7"


def test_a_dead_replica_is_service_unavailable_through_boto3():
    router = Router([Backend("gone", "127.0.0.1", closed_port())],
                    make_policy("random")).start()
    try:
        with pytest.raises(ClientError) as caught:
            invoke(runtime(router.url), {"messages": [{"role": "user", "content": "x"}]})
        assert caught.value.response["Error"]["Code"] == "ServiceUnavailable"
        assert "replica gone" in caught.value.response["Error"]["Message"]
    finally:
        router.close()


def test_a_stream_broken_mid_way_is_a_model_stream_error():
    """Scenario: the replica sends its headers and one line, then drops the connection; boto3
    gets the line, then a ModelStreamError event (not a short success)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        line = b'{"choices": [{"delta": {"content": "a"}}]}\n'
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/jsonlines\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(line), line))
        conn.close()

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    router = Router([Backend("flaky", "127.0.0.1", listener.getsockname()[1])],
                    make_policy("random")).start()
    try:
        reply = runtime(router.url).invoke_endpoint_with_response_stream(
            EndpointName="local", ContentType="application/json", Body=b'{"inputs": "x"}')
        events = iter(reply["Body"])
        assert next(events)["PayloadPart"]["Bytes"].startswith(b'{"choices"')
        with pytest.raises(EventStreamError) as caught:
            next(events)
        assert caught.value.response["Error"]["Code"] == "ModelStreamError"
        assert "replica flaky" in caught.value.response["Error"]["Message"]
    finally:
        router.close()
        thread.join()
        listener.close()


def test_answers_name_the_production_variant(router):
    reply = invoke(runtime(router.url), {"messages": [{"role": "user", "content": "x"}]})
    assert reply["InvokedProductionVariant"] == "AllTraffic"
    stream = runtime(router.url).invoke_endpoint_with_response_stream(
        EndpointName="local", ContentType="application/json",
        Body=json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": True}))
    assert stream["InvokedProductionVariant"] == "AllTraffic"
    assert b"".join(e["PayloadPart"]["Bytes"] for e in stream["Body"])


def test_another_endpoint_name_is_a_validation_error(replicas):
    """Scenario: the router stands for endpoint "mine"; a client naming "theirs" gets what
    SageMaker answers for an endpoint that does not exist, and no replica sees it."""
    router = start_router(replicas, endpoint_name="mine")
    try:
        assert invoke_named(router, "mine")["ResponseMetadata"]["HTTPStatusCode"] == 200
        with pytest.raises(ClientError) as caught:
            invoke_named(router, "theirs")
        assert caught.value.response["Error"]["Code"] == "ValidationError"
        assert "Endpoint theirs not found" in caught.value.response["Error"]["Message"]
        assert sum(router.served()) == 1
    finally:
        router.close()


def invoke_named(router, name: str) -> dict:
    return runtime(router.url).invoke_endpoint(
        EndpointName=name, ContentType="application/json",
        Body=json.dumps({"messages": [{"role": "user", "content": "x"}]}))


def test_a_session_cannot_be_created_on_the_stream_path(router):
    with pytest.raises(ClientError) as caught:
        runtime(router.url).invoke_endpoint_with_response_stream(
            EndpointName="local", ContentType="application/json", SessionId=NEW_SESSION,
            Body=json.dumps({"requestType": "NEW_SESSION"}))
    assert caught.value.response["Error"]["Code"] == "ValidationError"
    assert "InvokeEndpoint" in caught.value.response["Error"]["Message"]
    assert sum(router.served()) == 0
