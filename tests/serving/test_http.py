"""The SageMaker contract over real HTTP: a real server on a free port, a real client."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from lmcache_ext.config import load_config
from lmcache_ext.serving.app import build_endpoint


@pytest.fixture(scope="module")
def endpoint(tiny_model):
    config = load_config(env={}, overrides={"chunk_size": 32, "max_local_cpu_size": 0.05})
    served = build_endpoint(config, None, "127.0.0.1", 0, loaded=tiny_model)
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    yield served
    served.close()


def request(endpoint, method: str, path: str, body=None, raw: bytes | None = None,
            headers: dict | None = None):
    host, port = endpoint.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                    **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, response.getheader("Content-Type"), payload


def post(endpoint, path: str, body) -> tuple[int, dict]:
    status, _, payload = request(endpoint, "POST", path, body)
    return status, json.loads(payload)


DOC = "Our return policy: items can be returned within 30 days with a receipt. " * 4


def test_ping(endpoint):
    assert request(endpoint, "GET", "/ping")[0] == 200


def test_lmi_schema_non_streaming(endpoint):
    status, body = post(endpoint, "/invocations", {"inputs": DOC + "Can I return it?",
                                                   "parameters": {"max_new_tokens": 8}})
    assert status == 200 and isinstance(body["generated_text"], str)
    assert body["details"]["generated_tokens"] <= 8


def test_lmi_streaming_is_json_lines(endpoint):
    status, kind, payload = request(endpoint, "POST", "/invocations", {
        "inputs": DOC + "How long?", "parameters": {"max_new_tokens": 6}, "stream": True})
    lines = [json.loads(line) for line in payload.decode().splitlines()]
    assert status == 200 and kind == "application/jsonlines"
    assert len(lines) <= 6 and all("token" in line for line in lines)
    assert lines[-1]["generated_text"] == "".join(line["token"]["text"] for line in lines)


def test_second_request_reports_cached_tokens(endpoint):
    question = {"inputs": DOC + "Receipt needed?", "parameters": {"max_new_tokens": 4}}
    post(endpoint, "/invocations", question)
    _, body = post(endpoint, "/invocations", question)
    assert body["details"]["cached_tokens"] >= 32


def test_openai_completions_and_chat_by_payload_shape(endpoint):
    status, body = post(endpoint, "/invocations", {"prompt": DOC, "max_tokens": 5,
                                                   "temperature": 0})
    assert status == 200 and body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] <= 5
    status, body = post(endpoint, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_openai_streaming_is_server_sent_events(endpoint):
    status, kind, payload = request(endpoint, "POST", "/v1/completions", {
        "prompt": DOC, "max_tokens": 4, "stream": True, "temperature": 0})
    events = [line for line in payload.decode().split("\n\n") if line]
    assert status == 200 and kind == "text/event-stream"
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][len("data: "):])["object"] == "text_completion"


@pytest.mark.parametrize("body,needle", [
    ({"inputs": ""}, "inputs"),
    ({"inputs": 5}, "inputs"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, "parameters.max_new_tokens"),
    ({"inputs": "hi", "parameters": {"temperature": -1}}, "parameters.temperature"),
    ({"inputs": "hi", "parameters": {"beam_width": 2}}, "parameters.beam_width"),
    ({"inputs": "hi", "extra": 1}, "extra"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"nothing": 1}, "inputs"),
    ({"inputs": "x" * 5000}, "context"),
])
def test_bad_requests_are_400_naming_the_field(endpoint, body, needle):
    status, answer = post(endpoint, "/invocations", body)
    assert status == 400 and needle in answer["error"]


@pytest.mark.parametrize("path,raw,field", [
    ("/invocations", rb'{"inputs": "\ud800"}', "inputs"),
    ("/invocations", rb'{"inputs": "ok", "parameters": {"stop": ["\udc00"]}}',
     "parameters.stop[0]"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "a\ud83d"}]}',
     "messages[0].content"),
    ("/v1/completions", rb'{"prompt": ["\ud800x"]}', "prompt[0]"),
])
def test_a_lone_surrogate_is_400_naming_the_field(endpoint, path, raw, field):
    """Scenario: JSON may escape half a surrogate pair; that is no text, and no tokenizer takes
    it (it was a 500, "TextEncodeInput must be ...")."""
    status, _, payload = request(endpoint, "POST", path, raw=raw)
    error = json.loads(payload)["error"]
    assert status == 400 and error.startswith(f"{field}: not valid Unicode"), error


def test_a_whole_surrogate_pair_is_text(endpoint):
    status, _ = post(endpoint, "/invocations", {"inputs": "smile \U0001F600",
                                                "parameters": {"max_new_tokens": 2}})
    assert status == 200


@pytest.mark.parametrize("path", ["/invocations", "/v1/chat/completions"])
def test_an_unknown_chat_role_is_400_naming_the_allowed_ones(endpoint, path):
    """Scenario: a chat message with a role no template knows was served (200) as if valid."""
    status, answer = post(endpoint, path, {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "wizard", "content": "Hi"}],
        "max_tokens": 2})
    assert status == 400
    assert answer["error"] == ("messages[1].role: 'wizard' is not allowed (allowed: system, "
                               "user, assistant)")


def test_every_allowed_chat_role_is_served(endpoint):
    status, _ = post(endpoint, "/v1/chat/completions", {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
        "max_tokens": 2})
    assert status == 200


def test_json_nested_too_deeply_is_400(endpoint):
    status, _, payload = request(endpoint, "POST", "/invocations",
                                 raw=b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status == 400 and b"nested too deeply" in payload


def test_malformed_json_is_400(endpoint):
    status, _, payload = request(endpoint, "POST", "/invocations", raw=b"{not json")
    assert status == 400 and b"JSON" in payload


def test_body_over_6_mib_is_413(endpoint):
    status, _, _ = request(endpoint, "POST", "/invocations", raw=b"x" * (6 * 1024 * 1024 + 1))
    assert status == 413


def test_unknown_route_is_404(endpoint):
    assert request(endpoint, "GET", "/nope")[0] == 404


def test_an_internal_error_is_500_and_the_server_keeps_serving(endpoint, monkeypatch):
    def broken(ids, params, stats):
        raise RuntimeError("model fell over")
        yield  # a generator, like the real one

    monkeypatch.setattr(endpoint.service.generator, "generate", broken)
    status, body = post(endpoint, "/invocations", {"inputs": "hi"})
    assert status == 500 and "model fell over" in body["error"]
    monkeypatch.undo()
    assert post(endpoint, "/invocations", {"inputs": "hi",
                                           "parameters": {"max_new_tokens": 2}})[0] == 200


def test_ping_answers_while_a_long_generation_runs(endpoint, monkeypatch):
    """Scenario: /ping comes mid-generation (the model's lock held, tokens streamed so far); it
    is answered within 2 s, and the generation then goes on to its end."""
    real_generate = endpoint.service.generator.generate
    generating, pinged = threading.Event(), threading.Event()
    made: list[int] = []  # tokens made before /ping was answered, and after

    def generate_past_a_ping(ids, params, stats):
        events = real_generate(ids, params, stats)  # the real generator; holds its lock
        for n, event in enumerate(events):
            if n == 1:  # the prefill and a token done: the generation is under way
                generating.set()
                assert pinged.wait(30), "no /ping came"
                made.append(n)
            yield event
        made.append(n + 1)

    monkeypatch.setattr(endpoint.service.generator, "generate", generate_past_a_ping)
    result = {}

    def generate() -> None:
        result["status"] = post(endpoint, "/invocations", {
            "inputs": DOC * 3, "parameters": {"max_new_tokens": 200}})[0]

    worker = threading.Thread(target=generate)
    worker.start()
    assert generating.wait(60), "the generation never started"
    began = time.perf_counter()
    status = request(endpoint, "GET", "/ping")[0]
    waited = time.perf_counter() - began
    pinged.set()
    worker.join()
    assert status == 200 and waited < 2.0  # the contract: /ping within 2 s, even when busy
    assert result["status"] == 200
    assert made[0] == 1 and made[1] > made[0]  # /ping came between two tokens of one generation


def test_metrics_expose_engine_and_request_figures(endpoint):
    post(endpoint, "/invocations", {"inputs": DOC, "parameters": {"max_new_tokens": 2}})
    status, kind, payload = request(endpoint, "GET", "/metrics")
    text = payload.decode()
    assert status == 200 and kind.startswith("text/plain")
    for name in ("lmcache_ext_lookup_hit_tokens_total", "lmcache_ext_tier_used_bytes",
                 "lmcache_ext_time_to_first_token_seconds_bucket",
                 'lmcache_ext_http_requests_total{route="/invocations",status="200"}'):
        assert name in text
