"""Routing decisions without sockets: the modes and the session table."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lmcache_ext.routing.policy import (
    RouteRequest,
    SessionTable,
    make_policy,
    prefix_text,
)


def body(**payload) -> bytes:
    return json.dumps(payload).encode()


def test_prefix_text_renders_each_schema():
    assert prefix_text(body(inputs="abc")) == "abc"
    assert prefix_text(body(prompt=["abc"])) == "abc"
    assert prefix_text(body(messages=[{"role": "system", "content": "s"},
                                      {"role": "user", "content": "u"}])) == "system: s\nuser: u\n"
    assert prefix_text(b"not json") == "not json"


def test_prefix_aware_same_first_chunk_same_replica():
    policy = make_policy("prefix_aware", prefix_chars=16)
    shared = "x" * 16
    picks = {policy.choose(RouteRequest(body(inputs=shared + tail)), [0, 0, 0])
             for tail in ("a", "b", "c" * 500)}
    assert len(picks) == 1


def test_prefix_aware_spreads_distinct_prefixes():
    policy = make_policy("prefix_aware", prefix_chars=16)
    picks = Counter(policy.choose(RouteRequest(body(inputs=f"user {i:04d} asks")), [0, 0, 0])
                    for i in range(60))
    assert set(picks) == {0, 1, 2}


def test_prefix_aware_id_header_decides():
    policy = make_policy("prefix_aware")
    picks = {policy.choose(RouteRequest(body(inputs=f"prompt {i}"), prefix_id="conv-7"),
                           [0, 0, 0]) for i in range(20)}
    assert len(picks) == 1


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


def test_bad_mode_or_prefix_is_a_clear_error():
    with pytest.raises(ValueError, match="expected one of random, least_outstanding"):
        make_policy("round_robin")
    with pytest.raises(ValueError, match="prefix_chars"):
        make_policy("prefix_aware", prefix_chars=0)


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
