"""SageMaker stateful sessions on a real server over real HTTP: create, a session's turns (the
second one a cache hit, even after traffic that evicted everything else), close, expiry (an
injected clock), and every refusal: unknown, closed, expired, malformed, sessions off."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
import torch

from lmcache_ext.config import load_config
from lmcache_ext.serving.app import build_endpoint
from lmcache_ext.serving.protocol import parse_invocation
from lmcache_ext.sessions.protocol import (
    CLOSED_SESSION_HEADER,
    NEW_SESSION,
    NEW_SESSION_HEADER,
    SESSION_HEADER,
    parse_new_session,
)

EXPIRY_S = 600.0
CHUNK = 32
DOC = "Our return policy: items can be returned within 30 days with a receipt. " * 4


class Clock:
    """The sessions' time: moves only when a test moves it."""

    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def serve(tiny_model, clock: Clock, **overrides):
    # A CPU tier of ~64 tiny-model chunks: a flood of unrelated prompts evicts all it can.
    config = load_config(env={}, overrides={
        "chunk_size": CHUNK, "max_local_cpu_size": 0.001, "cost_aware_retrieval": False,
        "sessions_expiration_s": EXPIRY_S, **overrides})
    served = build_endpoint(config, None, "127.0.0.1", 0, loaded=tiny_model,
                            session_clock=clock)
    threading.Thread(target=served.server.serve_forever, daemon=True).start()
    return served


@pytest.fixture(scope="module")
def clock():
    return Clock()


@pytest.fixture(scope="module")
def endpoint(tiny_model, clock):
    served = serve(tiny_model, clock)
    yield served
    served.close()


def call(endpoint, body, headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
    """POST /invocations; (status, response headers, raw body)."""
    host, port = endpoint.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    conn.request("POST", "/invocations", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), payload


def create(endpoint, header: str | None = NEW_SESSION) -> str:
    status, headers, payload = call(endpoint, {"requestType": NEW_SESSION},
                                    {SESSION_HEADER: header} if header else {})
    assert status == 200, payload
    return parse_new_session(headers[NEW_SESSION_HEADER])[0]


def ask(endpoint, inputs: str, session: str | None = None, stream: bool = False,
        max_new_tokens: int = 8) -> tuple[int, dict]:
    """An LMI-schema turn; (status, the body, or the last JSON line of a stream)."""
    status, _, payload = call(endpoint, {"inputs": inputs, "stream": stream,
                                         "parameters": {"max_new_tokens": max_new_tokens}},
                              {SESSION_HEADER: session} if session else {})
    lines = payload.decode().splitlines() if stream and status == 200 else [payload.decode()]
    return status, json.loads(lines[-1])


def flood(endpoint, chunks: int = 200) -> None:
    """Unrelated traffic straight into the cache: evicts every chunk nobody pins."""
    engine = endpoint.engine
    for seed in range(chunks):
        tokens = [(seed * CHUNK + i) % 250 + 3 for i in range(CHUNK)]
        tokens[0] = seed % 250  # each prompt its own first chunk
        tokens[1] = seed // 250
        engine.store(tokens, torch.zeros(engine.layout.shape(CHUNK), dtype=engine.layout.dtype))


def pinned(endpoint, session: str | None = None) -> int:
    return endpoint.service.sessions.pins.pinned_bytes(session)


def metric(endpoint, name: str, **labels) -> float:
    return endpoint.engine.metrics.value(name, **labels)


def error(endpoint, body, headers=None) -> tuple[int, str]:
    status, _, payload = call(endpoint, body, headers)
    return status, json.loads(payload)["error"]


# ------------------------------------------------------------------ create


def test_create_answers_the_id_and_expiry_in_both_header_names(endpoint, clock):
    status, headers, payload = call(endpoint, {"requestType": NEW_SESSION},
                                    {SESSION_HEADER: NEW_SESSION})
    assert status == 200
    assert headers[NEW_SESSION_HEADER] == headers[SESSION_HEADER]
    session, expires_at = parse_new_session(headers[NEW_SESSION_HEADER])
    assert expires_at == int(clock.now + EXPIRY_S)
    assert session in json.loads(payload)["result"]
    assert create(endpoint, header=None) != session  # the header may be left out


# ------------------------------------------------------------------ turns


def test_a_sessions_second_turn_hits_its_history_after_traffic_evicted_everything(endpoint):
    session = create(endpoint)
    hits_before = metric(endpoint, "session_hits_total")
    turn1 = DOC + "Can I return it?"
    status, body = ask(endpoint, turn1, session)
    assert status == 200 and body["details"]["cached_tokens"] == 0
    assert pinned(endpoint, session) > 0
    stranger = "A different document nobody pinned. " * 8
    ask(endpoint, stranger)
    flood(endpoint)
    turn2 = turn1 + body["generated_text"] + " And without a receipt?"
    status, body = ask(endpoint, turn2, session)
    assert status == 200
    assert body["details"]["cached_tokens"] >= len(turn1) // CHUNK * CHUNK - CHUNK
    assert ask(endpoint, stranger + "?")[1]["details"]["cached_tokens"] == 0  # it was evicted
    assert metric(endpoint, "session_hits_total") == hits_before + 1


def test_a_streaming_turn_uses_and_pins_the_session(endpoint):
    session = create(endpoint)
    turn1 = DOC + "Streaming question one?"
    status, last = ask(endpoint, turn1, session, stream=True)
    assert status == 200 and last["generated_text"] is not None
    assert pinned(endpoint, session) > 0
    flood(endpoint)
    status, last = ask(endpoint, turn1 + last["generated_text"] + " Two?", session, stream=True)
    assert status == 200 and last["details"]["cached_tokens"] >= 2 * CHUNK


def test_the_session_header_is_read_in_any_case(endpoint):
    status, headers, _ = call(endpoint, {"requestType": NEW_SESSION},
                              {SESSION_HEADER.lower(): NEW_SESSION})
    session = parse_new_session(headers[NEW_SESSION_HEADER])[0]
    status, headers, _ = call(endpoint, {"requestType": "CLOSE"},
                              {SESSION_HEADER.upper(): session})
    assert status == 200 and headers[CLOSED_SESSION_HEADER] == session
    status, message = error(endpoint, {"inputs": "hi"}, {SESSION_HEADER.lower(): session})
    assert status == 400 and "closed" in message


def test_new_session_goes_with_the_create_body_not_an_inference(endpoint):
    status, message = error(endpoint, {"inputs": "hi"}, {SESSION_HEADER: NEW_SESSION})
    assert status == 400 and "requestType" in message and "non-streaming" in message
    status, _ = error(endpoint, {"inputs": "hi", "stream": True}, {SESSION_HEADER: NEW_SESSION})
    assert status == 400


# ------------------------------------------------------------------ close


def test_close_answers_the_closed_id_releases_the_pins_and_ends_the_session(endpoint):
    session = create(endpoint)
    ask(endpoint, DOC + "Close me after this?", session)
    assert pinned(endpoint, session) > 0
    status, headers, _ = call(endpoint, {"requestType": "CLOSE"}, {SESSION_HEADER: session})
    assert status == 200 and headers[CLOSED_SESSION_HEADER] == session
    assert pinned(endpoint, session) == 0
    status, message = error(endpoint, {"inputs": "hi"}, {SESSION_HEADER: session})
    assert status == 400 and f"session {session} is closed" in message
    status, message = error(endpoint, {"requestType": "CLOSE"}, {SESSION_HEADER: session})
    assert status == 400 and "closed" in message


def test_a_close_that_fails_to_release_is_424_and_the_server_goes_on(endpoint, monkeypatch):
    session = create(endpoint)

    def broken(_session_id):
        raise RuntimeError("release fell over")
    monkeypatch.setattr(endpoint.service.sessions.pins, "release", broken)
    status, message = error(endpoint, {"requestType": "CLOSE"}, {SESSION_HEADER: session})
    assert status == 424 and "release fell over" in message
    monkeypatch.undo()
    assert ask(endpoint, "hello", max_new_tokens=2)[0] == 200


# ------------------------------------------------------------------ expiry


def test_expiry_slides_on_use_then_ends_the_session_and_releases_its_pins(endpoint, clock):
    session = create(endpoint)
    ask(endpoint, DOC + "Expire me?", session)
    clock.now += EXPIRY_S - 1
    assert ask(endpoint, "Still here?", session, max_new_tokens=2)[0] == 200  # slides
    clock.now += EXPIRY_S - 1
    assert endpoint.service.sessions.store.state(session).value == "open"
    ask(endpoint, DOC + "Expire me?", session, max_new_tokens=2)
    assert pinned(endpoint, session) > 0
    clock.now += EXPIRY_S
    other = create(endpoint)  # any session request sweeps
    assert pinned(endpoint, session) == 0
    status, message = error(endpoint, {"inputs": "hi"}, {SESSION_HEADER: session})
    assert status == 400 and f"session {session} is expired" in message
    assert metric(endpoint, "sessions_ended_total", how="expired") >= 1
    assert other


def test_a_session_that_expires_during_its_turn_keeps_no_pins(endpoint, clock):
    """Scenario: a turn outlives its session (the sweep releases it mid-turn); the pins the
    turn's end takes are released again, never leaked."""
    sessions = endpoint.service.sessions
    session = sessions.begin_turn(create(endpoint))
    inputs = DOC + "A long turn?"
    ask(endpoint, inputs)  # the prompt's chunks are stored, as during the turn
    ids = endpoint.service.prompt_ids(parse_invocation({"inputs": inputs}))
    clock.now += EXPIRY_S
    assert session in sessions.store.sweep()
    sessions.end_turn(session, lambda: endpoint.engine.spans(ids), hit_tokens=0)
    assert pinned(endpoint, session) == 0


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("header,needle", [
    ("0123456789abcdef0123456789abcdef", "is unknown"),
    ("not a session id!", "not a session id"),
    ("x" * 300, "over 256"),
])
def test_a_bad_session_id_on_inference_is_400_naming_why(endpoint, header, needle):
    status, message = error(endpoint, {"inputs": "hi"}, {SESSION_HEADER: header})
    assert status == 400 and needle in message


@pytest.mark.parametrize("body,headers,needle", [
    ({"requestType": "OPEN"}, {SESSION_HEADER: NEW_SESSION}, "expected 'NEW_SESSION' or"),
    ({"requestType": NEW_SESSION, "stream": True}, {SESSION_HEADER: NEW_SESSION},
     "unexpected field"),
    ({"requestType": NEW_SESSION}, {SESSION_HEADER: "0123abcd"}, "must be NEW_SESSION"),
    ({"requestType": "CLOSE"}, {}, "needs the session's id"),
    ({"requestType": "CLOSE"}, {SESSION_HEADER: NEW_SESSION}, "needs the session's id"),
    ({"requestType": "CLOSE"}, {SESSION_HEADER: "0123abcd"}, "is unknown"),
])
def test_malformed_session_requests_are_400_saying_why(endpoint, body, headers, needle):
    status, message = error(endpoint, body, headers)
    assert status == 400 and needle in message


def test_metrics_show_open_sessions_and_pinned_bytes(endpoint):
    session = create(endpoint)
    ask(endpoint, DOC + "Metrics?", session)
    host, port = endpoint.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    assert "lmcache_ext_sessions_open " in text
    assert "lmcache_ext_session_pinned_bytes " in text
    assert metric(endpoint, "sessions_open") >= 1
    assert metric(endpoint, "session_pinned_bytes") == pinned(endpoint) > 0


def test_with_sessions_off_a_session_header_is_refused_saying_so(tiny_model):
    served = serve(tiny_model, Clock(), enable_stateful_sessions=False)
    try:
        for body, headers in (({"requestType": NEW_SESSION}, {SESSION_HEADER: NEW_SESSION}),
                              ({"inputs": "hi"}, {SESSION_HEADER: "0123abcd"})):
            status, message = error(served, body, headers)
            assert status == 400 and "not enabled" in message
            assert "OPTION_ENABLE_STATEFUL_SESSIONS" in message
        assert ask(served, "hi", max_new_tokens=2)[0] == 200
    finally:
        served.close()


def test_creates_beyond_max_open_sessions_are_429_and_nothing_grows(tiny_model):
    """Scenario: a client creates sessions and never closes them: past max_open_sessions each
    create is a 429 naming the key, the open count stays at the cap, and a close (or an
    expiry) makes room again."""
    clock = Clock()
    served = serve(tiny_model, clock, max_open_sessions=3)
    try:
        opened = [create(served) for _ in range(3)]
        for _ in range(5):
            status, message = error(served, {"requestType": NEW_SESSION},
                                    {SESSION_HEADER: NEW_SESSION})
            assert status == 429 and "max_open_sessions" in message, message
        assert served.service.sessions.store.open_count == 3
        status, _, _ = call(served, {"requestType": "CLOSE"}, {SESSION_HEADER: opened[0]})
        assert status == 200
        create(served)  # room for one
        clock.now += EXPIRY_S + 1  # every session expires: room for three again
        assert len({create(served) for _ in range(3)}) == 3
    finally:
        served.close()


def test_sessions_work_with_the_cache_off(tiny_model):
    config = load_config(env={}, overrides={"chunk_size": CHUNK})
    served = build_endpoint(config, None, "127.0.0.1", 0, cache_on=False, loaded=tiny_model)
    threading.Thread(target=served.server.serve_forever, daemon=True).start()
    try:
        session = create(served)
        assert ask(served, "hi", session, max_new_tokens=2)[0] == 200
        status, headers, _ = call(served, {"requestType": "CLOSE"}, {SESSION_HEADER: session})
        assert status == 200 and headers[CLOSED_SESSION_HEADER] == session
    finally:
        served.close()


def test_the_start_log_says_whether_sessions_are_on_with_expiry_and_pin_budgets(tiny_model,
                                                                                caplog):
    caplog.set_level("INFO", logger="lmcache_ext.serving.sessions")
    for overrides, needle in (
            ({}, "stateful sessions: on, at most 10000 open, expiry 600 s after last use; pins "
                 "up to 1 GiB per session, 0.0005 GiB in all (50% of the CPU tier)"),
            ({"enable_stateful_sessions": False}, "stateful sessions: off")):
        served = serve(tiny_model, Clock(), **overrides)
        served.close()
        assert needle in caplog.text


def test_a_session_expiring_while_its_turn_streams_amid_concurrent_creates(tiny_model):
    """Scenario: the real clock, sessions expiring 0.5 s after last use. A streamed turn of
    ~900 tokens outlives its session (the sweeper ends it mid-stream) while three clients keep
    creating sessions and running short turns on them, never closing them. The long turn
    streams to its end; every create and short turn succeeds; the expired session is refused
    afterwards and pins nothing; once every session has expired nothing is pinned or open,
    and a new session's second turn hits its history."""
    from lmcache_ext.sessions.store import SessionState

    served = serve(tiny_model, time.time, sessions_expiration_s=0.5)
    sessions = served.service.sessions
    try:
        long_session = create(served)
        host, port = served.server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=120)
        conn.request("POST", "/invocations", body=json.dumps({
            "inputs": DOC[:100], "stream": True,
            "parameters": {"max_new_tokens": 900}}).encode(),
            headers={"Content-Type": "application/json", SESSION_HEADER: long_session})
        response = conn.getresponse()
        assert response.status == 200
        expired_at: list[float] = []
        stop = threading.Event()
        results: list[int] = []

        def watch() -> None:
            while not stop.is_set() and not expired_at:
                if sessions.store.state(long_session) is SessionState.EXPIRED:
                    expired_at.append(time.monotonic())
                time.sleep(0.01)

        def client(index: int) -> None:
            while not stop.is_set():
                session = create(served)
                results.append(ask(served, f"client {index}: " + DOC[:80], session)[0])

        threads = [threading.Thread(target=watch)] + \
            [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        lines = [line for line in iter(response.readline, b"") if line.strip()]
        last_line_at = time.monotonic()
        conn.close()
        stop.set()
        for thread in threads:
            thread.join(60)
        assert json.loads(lines[-1])["details"]["generated_tokens"] == 900, lines[-1]
        assert expired_at and expired_at[0] < last_line_at - 0.05, \
            "the turn ended before its session expired: nothing was tested"
        assert results and set(results) == {200}, results
        status, message = error(served, {"inputs": "again?"}, {SESSION_HEADER: long_session})
        assert status == 400 and "expired" in message, message
        assert pinned(served, long_session) == 0
        deadline = time.monotonic() + 10
        while sessions.store.open_count and time.monotonic() < deadline:
            time.sleep(0.1)  # the sweeper ends them all
        assert sessions.store.open_count == 0 and pinned(served) == 0
        fresh = create(served)
        ask(served, DOC + "First turn.", fresh)
        assert ask(served, DOC + "First turn.", fresh)[1]["details"]["cached_tokens"] > 0
    finally:
        served.close()
