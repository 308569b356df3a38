"""Lookup-only requests on the built-in server: ``POST /lookup``, and ``/invocations`` with the
``lmcache-ext-lookup`` custom attribute (the way through SageMaker). A real server, real HTTP."""

from __future__ import annotations

import threading
import time

import pytest

from lmcache_ext.config import load_config
from lmcache_ext.serving.app import build_endpoint
from lmcache_ext.wire import (
    CUSTOM_ATTRIBUTES_HEADER,
    LOOKUP_REQUEST,
    wants_lookup,
    wants_lookup_property,
)
from tests.serving.test_http import post, request

CHUNK = 32
LOOKUP = {CUSTOM_ATTRIBUTES_HEADER: "tenant=7, lmcache-ext-lookup"}


@pytest.fixture(scope="module")
def endpoint(tiny_model):
    config = load_config(env={}, overrides={"chunk_size": CHUNK, "max_local_cpu_size": 0.05})
    served = build_endpoint(config, None, "127.0.0.1", 0, loaded=tiny_model)
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    yield served
    served.close()


def lookup(endpoint, body, via: str = "/lookup") -> tuple[int, dict]:
    headers = LOOKUP if via == "/invocations" else None
    status, _, payload = request(endpoint, "POST", via, body, headers=headers)
    import json

    return status, json.loads(payload)


def document(tag: str) -> str:
    return f"Document {tag}: the warranty covers parts and labour for two years. " * 3


def verify_lookup(answer: dict, prompt_tokens: int, cached_tokens: int) -> None:
    assert answer == {"lookup": {"prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens,
                                 "chunk_tokens": CHUNK}}


def metric(endpoint, name: str, **labels: str) -> float:
    return endpoint.service.metrics.registry.get_sample_value(f"lmcache_ext_{name}", labels) or 0


@pytest.mark.parametrize("via", ["/lookup", "/invocations"])
def test_a_lookup_reports_the_full_chunks_a_request_stored(endpoint, via):
    """Scenario: nothing cached -> 0; the document is served once; the same payload's lookup
    reports all of its whole chunks, by either route."""
    body = {"inputs": document(via), "parameters": {"max_new_tokens": 1}}
    status, answer = lookup(endpoint, body, via)
    prompt_tokens = answer["lookup"]["prompt_tokens"]
    assert status == 200 and prompt_tokens == len(document(via).encode())  # a byte tokenizer
    verify_lookup(answer, prompt_tokens, 0)
    assert post(endpoint, "/invocations", body)[0] == 200
    verify_lookup(lookup(endpoint, body, via)[1], prompt_tokens, prompt_tokens // CHUNK * CHUNK)


def test_every_payload_shape_is_looked_up_as_it_would_be_served(endpoint):
    chat = {"messages": [{"role": "system", "content": document("chat")}], "max_tokens": 1}
    completion = {"prompt": document("completion"), "max_tokens": 1}
    for body in (chat, completion):
        _, before = lookup(endpoint, body, "/invocations")
        assert before["lookup"]["cached_tokens"] == 0
        assert post(endpoint, "/invocations", body)[0] == 200
        _, after = lookup(endpoint, body)
        tokens = after["lookup"]["prompt_tokens"]
        assert after["lookup"]["cached_tokens"] == tokens // CHUNK * CHUNK > 0


def test_a_lookup_neither_generates_nor_stores_nor_counts_as_a_request(endpoint):
    """Scenario: a new document is looked up twice: no tokens, no TTFT, nothing stored, no
    engine lookup counted; the HTTP counter names it /lookup (on either route)."""
    engine = endpoint.engine.metrics
    before = {name: engine.value(name) for name in ("lookups_total", "stored_tokens_total",
                                                      "lookup_hit_tokens_total")}
    ttft = metric(endpoint, "time_to_first_token_seconds_count")
    served = metric(endpoint, "http_requests_total", route="/invocations", status="200")
    looked = metric(endpoint, "http_requests_total", route="/lookup", status="200")
    body = {"inputs": document("never served") * 4}
    began = time.perf_counter()
    for via in ("/invocations", "/lookup"):
        status, answer = lookup(endpoint, body, via)
        assert status == 200 and set(answer) == {"lookup"}
        assert answer["lookup"]["cached_tokens"] == 0
    seconds = time.perf_counter() - began
    assert {name: engine.value(name) for name in before} == before
    assert metric(endpoint, "time_to_first_token_seconds_count") == ttft
    assert metric(endpoint, "http_requests_total", route="/invocations", status="200") == served
    assert metric(endpoint, "http_requests_total", route="/lookup", status="200") == looked + 2
    print(f"two lookups of {answer['lookup']['prompt_tokens']} tokens: {seconds * 1000:.1f} ms")


@pytest.mark.parametrize("via", ["/lookup", "/invocations"])
@pytest.mark.parametrize("raw", [b"not json", b'{"foo": 1}', b'{"inputs": ""}',
                                 b'{"inputs": "x", "parameters": {"max_new_tokens": 0}}',
                                 b'{"prompt": "' + b"y" * 1100 + b'"}'])
def test_a_malformed_lookup_gets_the_400_of_invocations(endpoint, via, raw):
    headers = LOOKUP if via == "/invocations" else None
    status, _, payload = request(endpoint, "POST", via, raw=raw, headers=headers)
    plain, _, plain_payload = request(endpoint, "POST", "/invocations", raw=raw)
    assert status == plain == 400 and payload == plain_payload


def test_a_lookup_attribute_turned_off_is_an_ordinary_request(endpoint):
    status, _, payload = request(endpoint, "POST", "/invocations",
                                 {"inputs": "hello", "parameters": {"max_new_tokens": 2}},
                                 headers={CUSTOM_ATTRIBUTES_HEADER: "lmcache-ext-lookup=false"})
    assert status == 200 and b"generated_text" in payload


@pytest.mark.parametrize("value, wanted", [
    ("lmcache-ext-lookup", True), ("a=b,lmcache-ext-lookup", True),
    (" x ; LMCache-Ext-Lookup = true ", True), ("lmcache-ext-lookup=1", True),
    ("lmcache-ext-lookup=false", False), ("lmcache-ext-lookup=0", False), (None, False),
    ("", False), ("lmcache-ext-lookups", False), ("x=lmcache-ext-lookup", False)])
def test_custom_attributes_are_read_tolerantly(value, wanted):
    assert wants_lookup(value) is wanted


@pytest.mark.parametrize("value, wanted", [
    ("true", True), (" True ", True), ("1", True), ("", True), ("false", False),
    ("no", False), (None, False)])
def test_the_property_djl_makes_of_the_attribute_is_read_alike(value, wanted):
    """DJL's front end (LMI) turns ``lmcache-ext-lookup=<value>`` into a request property."""
    assert wants_lookup_property(value) is wanted
    assert wants_lookup(LOOKUP_REQUEST) and LOOKUP_REQUEST.partition("=")[2] == "true"


def test_lookups_beyond_the_cap_are_refused_with_429_naming_the_key(tiny_model, tmp_path):
    """Scenario: a flood of lookups against a shared tier slowed to 1 s a call (a real Redis
    behind a slow link): ``max_concurrent_lookups`` (2) run; the others are refused at once
    with a 429 naming the key, never queued; afterwards lookups are answered again."""
    from concurrent.futures import ThreadPoolExecutor

    from lmcache_ext.testing.redis_server import RedisServer
    from lmcache_ext.testing.slow_proxy import SlowProxy

    redis = RedisServer(tmp_path / "redis").start()
    proxy = SlowProxy("127.0.0.1", redis.port, 1.0).start()
    config = load_config(env={}, overrides={
        "chunk_size": CHUNK, "max_local_cpu_size": 0.05, "remote_url": proxy.url(),
        "remote_timeout_s": 5.0, "max_concurrent_lookups": 2})
    served = build_endpoint(config, None, "127.0.0.1", 0, loaded=tiny_model)
    threading.Thread(target=served.server.serve_forever, daemon=True).start()
    body = {"inputs": document("flood"), "parameters": {"max_new_tokens": 1}}
    try:
        with ThreadPoolExecutor(8) as pool:
            began = time.monotonic()
            replies = list(pool.map(lambda _: lookup(served, body), range(8)))
            took = time.monotonic() - began
        statuses = sorted(status for status, _ in replies)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, (statuses, took)
        assert all("max_concurrent_lookups" in answer["error"]
                   for status, answer in replies if status == 429)
        assert lookup(served, body)[0] == 200  # the cap frees as lookups end
        assert metric(served, "http_requests_total", route="/lookup", status="429") == \
            statuses.count(429)
    finally:
        served.close()
        proxy.stop()
        redis.stop()
