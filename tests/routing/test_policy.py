"""Routing decisions without sockets: the modes and the session table."""

from __future__ import annotations

import json
from collections import Counter

import botocore.session
import pytest

from lmcache_ext.routing.policy import (
    CONCURRENCY_THRESHOLD_RANGE,
    OPENAI_API,
    PREFIX_LENGTH_RANGE,
    SAGEMAKER_STRATEGIES,
    PrefixAware,
    RouteRequest,
    SessionTable,
    make_policy,
    messages_text,
    prefix_key,
)


def body(**payload) -> bytes:
    return json.dumps(payload).encode()


def test_sagemaker_facts_match_botocores_service_model():
    """Scenario: the ranges and strategy names we check deploy's arguments against are
    SageMaker's own (botocore's model of CreateEndpointConfig)."""
    model = botocore.session.get_session().get_service_model("sagemaker")
    prefix = model.shape_for("PrefixAwareRoutingConfig").members
    for name, wanted in (("PrefixLength", PREFIX_LENGTH_RANGE),
                         ("ConcurrencyThreshold", CONCURRENCY_THRESHOLD_RANGE)):
        assert (prefix[name].metadata["min"], prefix[name].metadata["max"]) == wanted
    assert set(SAGEMAKER_STRATEGIES) <= set(model.shape_for("RoutingStrategy").enum)


def test_the_key_is_the_first_prefix_length_bytes_of_the_body():
    raw = b'{"inputs": "' + "é".encode() * 600 + b'"}'
    assert prefix_key(RouteRequest(raw), 1024) == b"\0\0" + raw[:1024]  # bytes, not characters
    assert prefix_key(RouteRequest(b"short"), 1024) == b"\0\0short"


def test_openai_key_is_characters_of_the_messages_text():
    chat = body(messages=[{"role": "system", "content": "ab"},
                          {"role": "user", "content": [{"type": "text", "text": "cdé"},
                                                       {"type": "image_url"}]}])
    assert messages_text(chat) == "abcdé"
    assert prefix_key(RouteRequest(chat, api=OPENAI_API), 5) == b"\0\0abcd\xc3\xa9"
    assert messages_text(b"not json") == messages_text(body(prompt="x")) == ""


def test_prefix_aware_same_prefix_same_replica():
    policy = make_policy("prefix_aware", settings=PrefixAware(32))
    shared = "x" * 32
    picks = {policy.choose(RouteRequest(shared.encode() + tail), [0, 0, 0])
             for tail in (b"a", b"b", b"c" * 500)}
    assert len(picks) == 1


def test_prefix_aware_spreads_distinct_prefixes():
    policy = make_policy("prefix_aware", settings=PrefixAware(32))
    picks = Counter(policy.choose(RouteRequest(body(inputs=f"user {i:04d} asks")), [0, 0, 0])
                    for i in range(60))
    assert set(picks) == {0, 1, 2}


def test_prefix_aware_id_separates_but_does_not_replace_the_prefix():
    """Scenario: SageMaker routes requests with the same prefix *and* the same PrefixAwareId
    together; the id alone does not pin different prompts to one replica."""
    policy = make_policy("prefix_aware", settings=PrefixAware(1024))
    same = {policy.choose(RouteRequest(body(inputs="doc"), prefix_id="app-1"), [0, 0, 0])
            for _ in range(5)}
    assert len(same) == 1
    by_prompt = {policy.choose(RouteRequest(body(inputs=f"prompt {i}"), prefix_id="app-1"),
                               [0, 0, 0]) for i in range(30)}
    assert by_prompt == {0, 1, 2}
    by_app = {policy.choose(RouteRequest(body(inputs="doc"), prefix_id=f"app-{i}"), [0, 0, 0])
              for i in range(30)}
    assert by_app == {0, 1, 2}


def test_prefix_aware_spills_at_the_concurrency_threshold():
    policy = make_policy("prefix_aware", seed=0, settings=PrefixAware(1024, 2))
    request = RouteRequest(body(inputs="the shared document"))
    home = policy.choose(request, [0, 0, 0])
    load = [0, 0, 0]
    load[home] = 1
    assert policy.choose(request, load) == home  # under the threshold
    load = [5, 5, 5]
    load[home] = 2
    others = [i for i in range(3) if i != home]
    load[others[1]] = 1
    assert policy.choose(request, load) == others[1]  # at it: the idlest other replica
    assert policy.choose(request, [9, 9, 9]) == home  # nobody has more room: it stays


def test_prefix_aware_create_goes_to_least_loaded():
    policy = make_policy("prefix_aware", seed=1)
    create = RouteRequest(body(requestType="NEW_SESSION"), is_create=True)
    assert {policy.choose(create, [3, 0, 2]) for _ in range(10)} == {1}


def test_least_outstanding_picks_the_idlest_and_breaks_ties_at_random():
    policy = make_policy("least_outstanding", seed=0)
    request = RouteRequest(body(inputs="x"))
    assert {policy.choose(request, [2, 1, 5]) for _ in range(10)} == {1}
    assert {policy.choose(request, [0, 4, 0]) for _ in range(40)} == {0, 2}


def test_random_reaches_every_replica():
    policy = make_policy("random", seed=0)
    assert {policy.choose(RouteRequest(b"{}"), [0, 0, 0]) for _ in range(60)} == {0, 1, 2}


def test_bad_mode_or_settings_is_a_clear_error():
    with pytest.raises(ValueError, match="expected one of random, least_outstanding"):
        make_policy("round_robin")
    assert type(make_policy("PREFIX_AWARE")).__name__ == "PrefixAwarePolicy"
    with pytest.raises(ValueError, match="prefix_length: 0 must be an integer >= 1"):
        PrefixAware(0)
    with pytest.raises(ValueError, match="concurrency_threshold: 1.5 must be"):
        PrefixAware(1024, 1.5)
    with pytest.raises(ValueError, match="PrefixLength 16: SageMaker takes 1024 to 65536"):
        PrefixAware(16).check_sagemaker()
    with pytest.raises(ValueError, match="ConcurrencyThreshold 2000: SageMaker takes 1 to 1024"):
        PrefixAware(1024, 2000).check_sagemaker()


def test_session_table_forgets_least_recently_used_beyond_capacity():
    table = SessionTable(capacity=2)
    table.record("a", 0)
    table.record("b", 1)
    assert table.lookup("a") == 0  # a is now the most recent
    table.record("c", 2)
    assert (table.lookup("a"), table.lookup("b"), table.lookup("c")) == (0, None, 2)
    table.forget("a")
    assert table.lookup("a") is None and len(table) == 1


def test_session_table_counts_sessions_per_replica():
    table = SessionTable(capacity=3)
    for session, replica in (("a", 0), ("b", 0), ("c", 1), ("d", 2)):  # "a" falls out (LRU)
        table.record(session, replica)
    assert table.by_replica() == {0: 1, 1: 1, 2: 1}
    table.forget("c")
    assert table.by_replica() == {0: 1, 2: 1}


def test_least_outstanding_ties_go_to_the_replica_with_fewest_sessions():
    """Scenario: creates arriving together (nothing in flight) spread sessions evenly."""
    policy = make_policy("least_outstanding", seed=0)
    create = RouteRequest(body(requestType="NEW_SESSION"), is_create=True,
                          sessions_held=(2, 1, 2))
    assert {policy.choose(create, [0, 0, 0]) for _ in range(10)} == {1}
    assert {policy.choose(create, [0, 1, 0]) for _ in range(20)} == {0, 2}
