"""The router in front of real built-in replicas (tiny model) that speak sessions."""

from __future__ import annotations

import pytest

from lmcache_ext.config import load_config
from lmcache_ext.routing.policy import PrefixAware
from lmcache_ext.routing.replicas import start_replicas
from lmcache_ext.sessions.protocol import NEW_SESSION_HEADER, SESSION_HEADER, parse_new_session
from tests.routing.conftest import post, start_router
from tests.serving.conftest import tiny_model  # noqa: F401 - a fixture, shared

DOC = "Returns are accepted within 30 days with a receipt. " * 4  # 208 bytes: 6 chunks of 32


@pytest.fixture(scope="module")
def engines(tiny_model):  # noqa: F811 - the fixture imported above
    # Loads always: the tiny model recomputes so fast that the cost model may rightly skip a
    # load, and these tests are about where requests go, not that choice.
    config = load_config(env={}, overrides={"chunk_size": 32, "max_local_cpu_size": 0.05,
                                            "cost_aware_retrieval": False})
    replicas = start_replicas(3, config, loaded=tiny_model)
    yield replicas
    replicas.close()


def test_a_create_without_the_header_is_recorded_too(engines):
    """Scenario: the server takes a create body without the session header; the router
    records the session from the answer all the same."""
    router = start_router(engines.backends)
    try:
        created = post(router.url, {"requestType": "NEW_SESSION"})
        session_id, _ = parse_new_session(created.headers[NEW_SESSION_HEADER.lower()])
        turns = [post(router.url, {"inputs": f"{DOC} Question {i}?",
                                   "parameters": {"max_new_tokens": 2}},
                      {SESSION_HEADER: session_id}) for i in range(4)]
        assert {t.replica for t in turns} == {created.replica}
        assert all(t.json()["details"]["cached_tokens"] >= 192 for t in turns[1:])
    finally:
        router.close()


def test_prefix_aware_spreads_creates_sent_without_the_header(engines):
    router = start_router(engines.backends, "prefix_aware")
    try:
        picked = {post(router.url, {"requestType": "NEW_SESSION"}).replica for _ in range(12)}
        assert picked == {"replica-0", "replica-1", "replica-2"}
        assert len(router.sessions) == 12
    finally:
        router.close()


def test_prefix_aware_sends_a_shared_prefix_where_it_is_cached(engines):
    router = start_router(engines.backends, "prefix_aware", PrefixAware(len(DOC)))
    try:
        answers = [post(router.url, {"inputs": f"{DOC} Question {i}?",
                                     "parameters": {"max_new_tokens": 2}}) for i in range(3)]
        assert len({a.replica for a in answers}) == 1
        assert all(a.json()["details"]["cached_tokens"] >= 192 for a in answers[1:])
    finally:
        router.close()


def test_openai_path_keys_on_the_messages_text(engines):
    """Scenario: on SageMaker's OpenAI-compatible path the prefix-aware key is the messages'
    text, so bodies whose JSON differs before the text (field order, roles) still meet where
    the shared document is cached."""
    router = start_router(engines.backends, "prefix_aware", PrefixAware(len(DOC)))
    path = "/endpoints/local/openai/v1/chat/completions"
    bodies = [{"messages": [{"role": "system", "content": DOC},
                            {"role": "user", "content": "Question 1?"}], "max_tokens": 2},
              {"max_tokens": 2, "messages": [{"role": "user", "content": DOC + "Question 2?"}]},
              {"temperature": 0.0, "max_tokens": 2,
               "messages": [{"role": "user", "content": DOC[:100]},
                            {"role": "assistant", "content": DOC[100:]},
                            {"role": "user", "content": "Question 3?"}]}]
    try:
        answers = [post(router.url, body, path=path) for body in bodies]
        assert [a.status for a in answers] == [200, 200, 200], answers[0].body
        assert len({a.replica for a in answers}) == 1
        assert all(a.json()["choices"] for a in answers)
    finally:
        router.close()
