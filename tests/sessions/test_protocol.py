"""The wire facts: ids, the create answer's header value both ways, and session request bodies."""

from __future__ import annotations

import calendar
import time

import pytest

from lmcache_ext.sessions.protocol import (
    CLOSE,
    NEW_SESSION,
    SessionError,
    SessionRequest,
    check_session_id,
    format_new_session,
    new_session_id,
    parse_new_session,
    parse_session_request,
)


def test_new_ids_are_distinct_well_formed_and_128_bits():
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    for session_id in ids:
        assert check_session_id(session_id) == session_id
        assert len(session_id) == 32 and int(session_id, 16) >= 0


@pytest.mark.parametrize("value", ["6f1c2d3e-aaaa-bbbb-cccc-0123456789ab", "A1", "x"])
def test_other_servers_ids_are_accepted(value):
    """DJL's ids are UUIDs with dashes; any letters, digits and inner dashes are ids."""
    assert check_session_id(value) == value


@pytest.mark.parametrize("value", ["", "-abc", "abc-", "a b", "a;b", "a\nb", "é", "a" * 257])
def test_malformed_ids_are_400s(value):
    with pytest.raises(SessionError) as caught:
        check_session_id(value)
    assert caught.value.status == 400


def test_the_create_answer_round_trips_to_the_second():
    expires_at = float(calendar.timegm((2026, 12, 1, 18, 30, 5, 0, 0, 0)))
    value = format_new_session("abc123", expires_at + 0.7)
    assert value == "abc123; Expires=2026-12-01T18:30:05Z"
    assert parse_new_session(value) == ("abc123", expires_at)


def test_a_create_answer_without_expiry_and_with_a_bad_one():
    assert parse_new_session("abc123") == ("abc123", None)
    assert parse_new_session("abc123; Path=/") == ("abc123", None)
    with pytest.raises(SessionError, match="bad Expires"):
        parse_new_session("abc123; Expires=tomorrow")
    with pytest.raises(SessionError, match="not a session id"):
        parse_new_session("; Expires=2026-12-01T18:30:05Z")


def test_the_expiry_stamp_is_utc_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        expires_at = float(calendar.timegm((2026, 1, 2, 3, 4, 5, 0, 0, 0)))
        assert format_new_session("a", expires_at).endswith("Expires=2026-01-02T03:04:05Z")
        assert parse_new_session(format_new_session("a", expires_at))[1] == expires_at
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize("body,expected", [
    ({"requestType": NEW_SESSION}, SessionRequest(NEW_SESSION)),
    ({"requestType": CLOSE}, SessionRequest(CLOSE)),
    ({"inputs": "hello"}, None),
    (["requestType"], None),
])
def test_session_bodies_and_inference_bodies_are_told_apart(body, expected):
    assert parse_session_request(body) == expected


@pytest.mark.parametrize("body,message", [
    ({"requestType": "OPEN"}, "expected 'NEW_SESSION' or 'CLOSE'"),
    ({"requestType": "new_session"}, "expected"),
    ({"requestType": None}, "expected"),
    ({"requestType": NEW_SESSION, "inputs": "hi"}, "unexpected field"),
    ({"requestType": CLOSE, "stream": True}, "unexpected field"),
])
def test_malformed_session_bodies_are_400s_saying_why(body, message):
    with pytest.raises(SessionError, match=message) as caught:
        parse_session_request(body)
    assert caught.value.status == 400
