"""The SageMaker stateful-session protocol on the wire: header names, ids, expiry stamps, and the
create/close request bodies. Shared by the server, the router and the client; imports nothing of
theirs.

Facts (botocore's sagemaker-runtime model, DJL's session manager, AWS's model-hosting container
standards): a request carries ``X-Amzn-SageMaker-Session-Id`` with ``NEW_SESSION`` or a session
id; create and close are the bodies ``{"requestType": "NEW_SESSION"}`` and ``{"requestType":
"CLOSE"}``; create answers ``<id>; Expires=YYYY-MM-DDTHH:MM:SSZ`` in
``X-Amzn-SageMaker-New-Session-Id`` (what botocore reads) and ``X-Amzn-SageMaker-Session-Id``
(what DJL sends); close answers ``X-Amzn-SageMaker-Closed-Session-Id: <id>``.
"""

from __future__ import annotations

import calendar
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"
CLOSED_SESSION_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"
NEW_SESSION = "NEW_SESSION"  # the header's value, and the create body's requestType
CLOSE = "CLOSE"
REQUEST_TYPE = "requestType"
FAILED_STATUS = 424  # a create or close that failed on the server's side (DJL's code for it)
MAX_ID_CHARS = 256
ID_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
EXPIRES_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class SessionError(ValueError):
    """A session problem the caller caused or a session step that failed: ``status`` is the
    HTTP status (400 malformed / unknown / expired; ``FAILED_STATUS`` a failed create or
    close)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def new_session_id() -> str:
    """128 bits from the OS's randomness, as 32 hex digits: never guessable."""
    return secrets.token_hex(16)


def check_session_id(value: str) -> str:
    """``value`` if it is a well-formed session id, else a 400 ``SessionError`` saying why."""
    if len(value) > MAX_ID_CHARS:
        raise SessionError(f"{SESSION_HEADER}: {len(value)} characters, over {MAX_ID_CHARS}")
    if not ID_PATTERN.match(value):
        raise SessionError(f"{SESSION_HEADER}: {value[:64]!r} is not a session id "
                           f"(letters, digits and inner dashes)")
    return value


def format_new_session(session_id: str, expires_at: float) -> str:
    """The create answer's header value: ``<id>; Expires=YYYY-MM-DDTHH:MM:SSZ`` (UTC)."""
    return f"{session_id}; Expires={time.strftime(EXPIRES_FORMAT, time.gmtime(expires_at))}"


def parse_new_session(value: str) -> tuple[str, float | None]:
    """A create answer's header value -> (id, expiry as epoch seconds, None if not stated)."""
    session_id, _, rest = value.partition(";")
    session_id = check_session_id(session_id.strip())
    expires_at = None
    for part in rest.split(";"):
        name, _, stamp = part.strip().partition("=")
        if name.lower() == "expires" and stamp:
            try:
                expires_at = float(calendar.timegm(time.strptime(stamp.strip(), EXPIRES_FORMAT)))
            except ValueError as exc:
                raise SessionError(f"{NEW_SESSION_HEADER}: bad Expires {stamp!r}") from exc
    return session_id, expires_at


@dataclass(frozen=True)
class SessionRequest:
    """A create (``NEW_SESSION``) or close (``CLOSE``) request; the body says which."""

    request_type: str


def parse_session_request(body: Any) -> SessionRequest | None:
    """``body`` (decoded JSON) as a session request, None if it is not one (an inference
    request). A body with ``requestType`` must be exactly ``{"requestType": NEW_SESSION|CLOSE}``:
    anything else is a 400."""
    if not isinstance(body, dict) or REQUEST_TYPE not in body:
        return None
    extra = sorted(set(body) - {REQUEST_TYPE})
    if extra:
        raise SessionError(f"session request: unexpected field(s) {', '.join(extra)}")
    kind = body[REQUEST_TYPE]
    if kind not in (NEW_SESSION, CLOSE):
        raise SessionError(f"{REQUEST_TYPE}: expected {NEW_SESSION!r} or {CLOSE!r}, "
                           f"got {kind!r}")
    return SessionRequest(kind)
