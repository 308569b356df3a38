"""The router over real HTTP in front of three real session-speaking replicas."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

from lmcache_ext.routing.policy import make_policy
from lmcache_ext.routing.router import Backend, Router
from lmcache_ext.sessions.protocol import (
    CLOSED_SESSION_HEADER,
    NEW_SESSION,
    NEW_SESSION_HEADER,
    SESSION_HEADER,
    parse_new_session,
)
from lmcache_ext.testing.session_replica import SessionReplica
from tests.routing.conftest import chat, closed_port, post, start_router

CREATE = {"requestType": "NEW_SESSION"}
CLOSE = {"requestType": "CLOSE"}


def create(url: str) -> tuple[str, str]:
    """(session id, replica name) of a new session made through the router."""
    answer = post(url, CREATE, {SESSION_HEADER: NEW_SESSION})
    assert answer.status == 200, answer.body
    session_id, expires_at = parse_new_session(answer.headers[NEW_SESSION_HEADER.lower()])
    assert expires_at is not None
    return session_id, answer.replica


def verify_sticky(replicas, session_id: str, replica: str) -> None:
    """Every request the replicas saw for ``session_id`` reached ``replica`` alone."""
    for each in replicas:
        seen = [s for s in each.seen if s.session == session_id]
        assert bool(seen) == (each.name == replica), (each.name, len(seen))


def test_sessions_stay_on_the_replica_that_created_them(replicas, router):
    """Scenario: 24 sessions created by the random mode spread over 3 replicas; every turn and
    the close of each reach its replica; a closed session is forgotten."""
    sessions = [create(router.url) for _ in range(24)]
    assert set(Counter(name for _, name in sessions)) == {"r0", "r1", "r2"}
    for turn in range(4):
        for session_id, name in sessions:
            answer = post(router.url, chat(f"turn {turn}"), {SESSION_HEADER: session_id})
            assert answer.status == 200 and answer.replica == name
    for session_id, name in sessions:
        answer = post(router.url, CLOSE, {SESSION_HEADER: session_id})
        assert answer.headers[CLOSED_SESSION_HEADER.lower()] == session_id
        assert answer.replica == name
        verify_sticky(replicas, session_id, name)
    assert len(router.sessions) == 0
    assert all(not r.open_sessions() for r in replicas)


def test_a_session_the_router_never_saw_reaches_a_replica_that_says_so(router):
    answer = post(router.url, chat(), {SESSION_HEADER: "abc123"})
    assert answer.status == 400 and "unknown" in answer.json()["error"]


def test_an_expired_session_still_reaches_its_replica(replicas, router):
    """Scenario: the replica that knew the session says it expired (not 'unknown')."""
    session_id, name = create(router.url)
    next(r for r in replicas if r.name == name).expire(session_id)
    answer = post(router.url, chat(), {SESSION_HEADER: session_id})
    assert answer.status == 400 and "expired" in answer.json()["error"]
    assert answer.replica == name


def wait_until(condition, what: str, limit_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds; an error naming ``what`` after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {limit_s} s for {what}")
        time.sleep(0.01)


def test_least_outstanding_avoids_a_busy_replica(replicas):
    """Scenario: one replica holds a request in flight; every later request goes elsewhere."""
    router = start_router(replicas, "least_outstanding")
    for replica in replicas:
        replica.hold()
    busy = threading.Thread(target=post, args=(router.url, chat("slow")), daemon=True)
    busy.start()
    try:
        wait_until(lambda: sum(router.served()) == 1, "the slow request to be forwarded")
        slow = router.served().index(1)
        others = [r for i, r in enumerate(replicas) if i != slow]
        for replica in others:
            replica.release()
        replicas[slow].wait_held()
        picked = Counter(post(router.url, chat(f"q{i}")).replica for i in range(30))
        assert set(picked) == {r.name for r in others}
    finally:
        for replica in replicas:
            replica.release()
        busy.join()
        router.close()


def test_prefix_aware_keeps_a_prefix_on_one_replica(replicas):
    router = start_router(replicas, "prefix_aware")
    try:
        for user in range(6):
            history = [{"role": "user", "content": f"user {user} " * 300}]
            picked = set()
            for turn in range(3):
                history.append({"role": "user", "content": f"turn {turn}"})
                picked.add(post(router.url, {"messages": history}).replica)
            assert len(picked) == 1
    finally:
        router.close()


def test_headers_pass_through_both_ways(replicas, router):
    answer = post(router.url, chat(), {"X-Test-Trace": "t-42",
                                       "X-Amzn-SageMaker-Custom-Attributes": "tenant=7"})
    assert answer.headers["x-test-trace"] == "t-42"
    assert answer.headers["x-amzn-sagemaker-custom-attributes"] == "tenant=7"
    seen = next(s for r in replicas for s in r.seen)
    assert seen.headers["X-Test-Trace"] == "t-42"


def test_streaming_passes_through_as_json_lines(router):
    parts = urlsplit(router.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", "/invocations", json.dumps({**chat(), "stream": True}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    lines = [json.loads(line) for line in response.read().splitlines()]
    conn.close()
    assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
    assert response.getheader("Content-Type") == "application/jsonlines"
    text = "".join(line["choices"][0]["delta"]["content"] for line in lines)
    assert text == f"{response.getheader('X-Lmcache-Ext-Replica')}:1"
    assert lines[-1]["usage"]["prompt_tokens"] == 1


def test_ping_and_bad_requests(router):
    parts = urlsplit(router.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("GET", "/ping")
    ping = conn.getresponse()
    assert ping.status == 200 and json.loads(ping.read())["healthy"] == ["r0", "r1", "r2"]
    conn.request("POST", "/nowhere", b"{}")
    assert conn.getresponse().status == 404
    conn.close()
    raw = socket.create_connection((parts.hostname, parts.port), timeout=60)
    raw.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.recv(1024).startswith(b"HTTP/1.1 411")
    raw.close()


# ---------------------------------------------------------------- dead replicas


def test_a_dead_replica_is_a_502_naming_it():
    router = Router([Backend("gone", "127.0.0.1", closed_port())],
                    make_policy("random")).start()
    try:
        answer = post(router.url, chat())
        assert answer.status == 502 and "replica gone" in answer.json()["error"]
        ping = post(router.url, {}, path="/ping")  # POST /ping: not a route
        assert ping.status == 404
    finally:
        router.close()


def test_a_session_whose_replica_is_gone_is_unknown_and_others_go_elsewhere(replicas, router):
    """Scenario: scale-in; the replica no longer listens. Its session is a 400 "unknown" (the
    client re-creates it), and requests without a session reach the replicas left."""
    session_id, name = create(router.url)
    next(r for r in replicas if r.name == name).close()
    answer = post(router.url, chat(), {SESSION_HEADER: session_id})
    assert answer.status == 400
    assert f"session {session_id} is unknown: replica {name} is gone" in answer.json()["error"]
    for _ in range(6):
        answer = post(router.url, chat())
        assert answer.status == 200 and answer.replica != name


def test_a_gone_replica_that_comes_back_takes_requests_again(replicas):
    """Scenario: a replica refuses connections (gone), then a server starts on its port again
    (a restart): after the recheck time one request tries it, and it takes requests again."""
    port = closed_port()
    live = replicas[0]
    router = Router([Backend("back", "127.0.0.1", port), Backend.from_url(live.url, live.name)],
                    make_policy("random", seed=1), gone_recheck_s=0.3).start()
    try:
        for _ in range(20):
            answer = post(router.url, chat())
            assert answer.status == 200 and answer.replica == live.name
            if router.is_gone(0):
                break
        assert router.is_gone(0)
        restarted = SessionReplica("back", port=port).start()
        try:
            time.sleep(0.4)
            served = [post(router.url, chat()) for _ in range(12)]
            assert all(a.status == 200 for a in served)
            assert "back" in {a.replica for a in served}
            assert not router.is_gone(0)
        finally:
            restarted.close()
    finally:
        router.close()


def test_a_replica_that_hangs_up_or_stays_silent_is_a_502():
    """Scenario: one replica accepts and closes at once, one accepts and never answers; the
    router's timeout ends the second (no hang)."""
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    held: list[socket.socket] = []

    def accept(listener: socket.socket, close: bool) -> None:
        conn, _ = listener.accept()
        conn.close() if close else held.append(conn)

    threads = [threading.Thread(target=accept, args=(s, i == 0), daemon=True)
               for i, s in enumerate(listeners)]
    for thread in threads:
        thread.start()
    for index, listener in enumerate(listeners):
        backend = Backend(f"b{index}", "127.0.0.1", listener.getsockname()[1])
        router = Router([backend], make_policy("random"), timeout_s=1.0).start()
        try:
            answer = post(router.url, chat())
            assert answer.status == 502 and f"replica b{index}" in answer.json()["error"]
        finally:
            router.close()
    for sock in listeners + held:
        sock.close()


def test_prefix_aware_spreads_creates(replicas):
    """Scenario: creates have no prompt to hash; they go where least_outstanding says (ties at
    random), not all to one replica."""
    router = start_router(replicas, "prefix_aware")
    try:
        picked = {post(router.url, CREATE, {SESSION_HEADER: NEW_SESSION}).replica
                  for _ in range(12)}
        assert picked == {"r0", "r1", "r2"}
    finally:
        router.close()


def test_requests_racing_to_a_gone_replica_all_reach_the_one_left(replicas):
    """Scenario: many requests at once while a replica has just gone; each one that finds it
    refusing goes to the replica left (none is a 502 because another found it first)."""
    live = replicas[0]
    router = Router([Backend("gone", "127.0.0.1", closed_port()),
                     Backend.from_url(live.url, live.name)], make_policy("random", seed=1)).start()
    try:
        answers: list = []
        start = threading.Barrier(4)  # the router's listen backlog is 5 connections

        def send() -> None:
            start.wait()
            answers.append(post(router.url, chat()))
        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [a.status for a in answers] == [200] * 4
        assert {a.replica for a in answers} == {live.name}
    finally:
        router.close()
