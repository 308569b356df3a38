"""One request to an endpoint, with or without a session, over boto3 or plain HTTP.

Both transports answer alike: a ``Reply`` (body, ``NewSessionId``, ``ClosedSessionId``), a
stream of body bytes, or an error: ``SessionGone`` when the endpoint says the session expired or
is unknown (HTTP 400 naming the session's state; through SageMaker a ``ModelError`` whose
``OriginalStatusCode`` is 400, or a ``ValidationError`` about the session), ``EndpointError``
for anything else. ``custom_attributes`` (optional) is SageMaker's ``CustomAttributes``: boto3
sends it, SageMaker forwards it verbatim to the container as ``X-Amzn-SageMaker-Custom-Attributes``,
and the HTTP transport sends that header itself. Thread-safe: each call opens its own connection
(boto3 clients are thread-safe).
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from lmcache_ext.sessions.protocol import (
    CLOSED_SESSION_HEADER,
    NEW_SESSION_HEADER,
    SESSION_HEADER,
)
from lmcache_ext.wire import CUSTOM_ATTRIBUTES_HEADER

DEFAULT_TIMEOUT_S = 600.0
CONTENT_TYPE = "application/json"
# How the server names a session it no longer has (sessions.protocol's SessionError, 400).
_GONE = re.compile(r"session.*\b(expired|unknown|not found|no such|closed)\b|"
                   r"\b(expired|unknown)\b.*session", re.IGNORECASE | re.DOTALL)


class EndpointError(RuntimeError):
    """The endpoint refused or failed a request: ``status`` is the container's HTTP status
    (0 when there was no answer), the message its words."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class SessionGone(EndpointError):
    """The endpoint no longer has the session (expired, unknown, closed): create a new one."""


def error_for(status: int, message: str) -> EndpointError:
    """The error for a non-2xx answer: SessionGone where a 400 names a gone session."""
    kind = SessionGone if status == 400 and _GONE.search(message) else EndpointError
    return kind(f"HTTP {status}: {message}", status)


@dataclass(frozen=True)
class Reply:
    body: bytes
    new_session: str | None = None  # the create answer's "<id>; Expires=..."
    closed_session: str | None = None


class HttpTransport:
    """``POST {url}/invocations``: a built-in server, a router, any container on its port."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"endpoint URL {url!r}: expected http://HOST:PORT")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout_s = timeout_s

    def _send(self, body: bytes, session: str | None,
              custom_attributes: str | None = None) -> tuple[http.client.HTTPConnection,
                                                             http.client.HTTPResponse]:
        headers = {"Content-Type": CONTENT_TYPE, **({SESSION_HEADER: session} if session else {}),
                   **({CUSTOM_ATTRIBUTES_HEADER: custom_attributes} if custom_attributes
                      else {})}
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            conn.request("POST", "/invocations", body, headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise EndpointError(f"http://{self.host}:{self.port}: {type(exc).__name__}: "
                                f"{exc}") from exc
        if not 200 <= response.status < 300:
            text = response.read().decode("utf-8", "replace")
            conn.close()
            raise error_for(response.status, _message(text))
        return conn, response

    def invoke(self, body: bytes, session: str | None = None,
               custom_attributes: str | None = None) -> Reply:
        conn, response = self._send(body, session, custom_attributes)
        try:
            data = response.read()
        finally:
            conn.close()
        return Reply(data, response.getheader(NEW_SESSION_HEADER),
                     response.getheader(CLOSED_SESSION_HEADER))

    def invoke_stream(self, body: bytes, session: str | None = None) -> Iterator[bytes]:
        """The answer's body as it arrives; errors before the first byte are raised here, at
        the call, not at the first ``next``."""
        conn, response = self._send(body, session)
        return _pieces(conn, response)


def _pieces(conn: http.client.HTTPConnection,
            response: http.client.HTTPResponse) -> Iterator[bytes]:
    try:
        while piece := response.read1(64 * 1024):
            yield piece
    except (OSError, http.client.HTTPException) as exc:
        raise EndpointError(f"stream broke: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()


def _message(text: str) -> str:
    """The ``error`` field of a JSON error body, else the body."""
    try:
        payload = json.loads(text)
    except ValueError:
        return text
    return str(payload.get("error", text)) if isinstance(payload, dict) else text


class SageMakerTransport:
    """boto3's ``sagemaker-runtime``: ``invoke_endpoint`` and
    ``invoke_endpoint_with_response_stream`` on ``endpoint_name``. ``endpoint_url`` points it
    elsewhere (the local router); ``client`` reuses a boto3 client."""

    def __init__(self, endpoint_name: str, endpoint_url: str | None = None,
                 region: str | None = None, client: Any = None):
        if client is None:
            import boto3  # the `client` extra

            client = boto3.client("sagemaker-runtime", endpoint_url=endpoint_url,
                                  region_name=region)
        self.client = client
        self.endpoint_name = endpoint_name

    def _call(self, method: str, body: bytes, session: str | None,
              custom_attributes: str | None = None) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"SessionId": session} if session else {}
        if custom_attributes:
            extra["CustomAttributes"] = custom_attributes
        try:
            return getattr(self.client, method)(EndpointName=self.endpoint_name, Body=body,
                                                ContentType=CONTENT_TYPE, **extra)
        except ClientError as exc:
            raise _client_error(exc) from exc
        except BotoCoreError as exc:
            raise EndpointError(f"{self.endpoint_name}: {exc}") from exc

    def invoke(self, body: bytes, session: str | None = None,
               custom_attributes: str | None = None) -> Reply:
        reply = self._call("invoke_endpoint", body, session, custom_attributes)
        return Reply(reply["Body"].read(), reply.get("NewSessionId"),
                     reply.get("ClosedSessionId"))

    def invoke_stream(self, body: bytes, session: str | None = None) -> Iterator[bytes]:
        reply = self._call("invoke_endpoint_with_response_stream", body, session)
        return _events(reply["Body"])


def _events(stream: Any) -> Iterator[bytes]:
    from botocore.exceptions import ClientError

    try:
        for event in stream:
            if "PayloadPart" in event:
                yield event["PayloadPart"]["Bytes"]
    except ClientError as exc:  # ModelStreamError, InternalStreamFailure
        raise EndpointError(f"stream broke: {exc}") from exc


def _client_error(exc: Any) -> EndpointError:
    """A botocore ClientError as ours: a ModelError carries the container's status and words."""
    response = exc.response
    code = response.get("Error", {}).get("Code", "")
    if code == "ModelError" and "OriginalStatusCode" in response:
        return error_for(int(response["OriginalStatusCode"]),
                         _message(str(response.get("OriginalMessage", ""))))
    message = response.get("Error", {}).get("Message", str(exc))
    if code == "ValidationError" and _GONE.search(message):
        return SessionGone(f"{code}: {message}", 400)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return EndpointError(f"{code or 'error'} (HTTP {status}): {message}", status)
