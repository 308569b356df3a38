"""The router's HTTP side: SageMaker's front end for local replicas.

Paths served:
- ``POST /invocations``, ``GET /ping``: the container's own paths, forwarded as they are
  (status, headers and body both ways; a streamed answer is relayed piece by piece).
- ``POST /endpoints/{name}/invocations``: SageMaker runtime's ``InvokeEndpoint``. A container
  answer of 2xx is relayed (with ``X-Amzn-SageMaker-New-Session-Id`` / ``-Closed-Session-Id``,
  which botocore reads as ``NewSessionId`` / ``ClosedSessionId``; a create answered as LMI
  answers it, in ``X-Amzn-SageMaker-Session-Id``, becomes ``NewSessionId`` as on SageMaker:
  ``new_session_value``); any other status becomes
  SageMaker's ``ModelError`` (424, with ``OriginalStatusCode`` and ``OriginalMessage``).
- ``POST /endpoints/{name}/invocations-response-stream``: ``InvokeEndpointWithResponseStream``;
  the container's streamed body relayed as event-stream ``PayloadPart`` events. As on SageMaker,
  a session cannot be created on this path (a ``ValidationError``).
- ``POST /endpoints/{name}/openai/v1/chat/completions``: SageMaker's OpenAI-compatible path,
  forwarded to the container's ``/v1/chat/completions`` (AWS does not say which container path
  it calls; the built-in server and vLLM serve this one) and relayed as it comes. Its
  prefix-aware key is the messages' text, not the body's bytes (``policy``).

REST answers name the production variant (``x-Amzn-Invoked-Production-Variant``); request
headers (custom attributes, content type, accept) reach the container as they came.

Every answer carries ``X-Lmcache-Ext-Replica: <replica name>`` when a replica served it. A
replica that refuses a connection is gone (scaled in, drained, exited), as an instance SageMaker
took away: new requests go to the other replicas, and a request naming one of its sessions is
a 400 "session ... is unknown" (a client re-creates the session elsewhere and resends the
history). A replica that drops the connection or stays silent past ``timeout_s``, or the last
one left, is a 502 naming it (``ServiceUnavailable``, 503, on the REST paths), never a hang.
The router is one
endpoint: with ``endpoint_name`` set, a REST path naming another is a ``ValidationError`` as
SageMaker answers for an endpoint that does not exist; without it any name is accepted. A
session id the router
never saw (it restarted) goes where the mode says: that replica answers 400 ("unknown") and a
client such as ``lmcache_ext.client`` creates a new session.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from lmcache_ext.routing import eventstream
from lmcache_ext.routing.policy import (
    INVOKE_API,
    OPENAI_API,
    Policy,
    RouteRequest,
    SessionTable,
)
from lmcache_ext.sessions.protocol import (
    CLOSED_SESSION_HEADER,
    NEW_SESSION,
    NEW_SESSION_HEADER,
    REQUEST_TYPE,
    SESSION_HEADER,
    SessionError,
    parse_new_session,
)
from lmcache_ext.wire import MAX_BODY_BYTES

log = logging.getLogger(__name__)

REPLICA_HEADER = "X-Lmcache-Ext-Replica"
PREFIX_AWARE_HEADER = "X-Amzn-SageMaker-Prefix-Aware-Id"  # botocore's PrefixAwareId
STREAM_ACCEPT_HEADER = "X-Amzn-SageMaker-Accept"  # the stream API's Accept
STREAM_CONTENT_TYPE_HEADER = "X-Amzn-SageMaker-Content-Type"  # the stream API's ContentType
ERROR_TYPE_HEADER = "x-amzn-ErrorType"
VARIANT_HEADER = "x-Amzn-Invoked-Production-Variant"  # botocore's InvokedProductionVariant
VARIANT_NAME = "AllTraffic"  # SageMaker's usual name for an endpoint's one production variant
DEFAULT_TIMEOUT_S = 600.0  # a replica silent this long (connect, or between two reads) is dead
CONNECT_TIMEOUT_S = 5.0
# A replica that refused a connection gets no new requests for this long; then one request may
# try it again (a refused connect costs a millisecond), so a restarted replica comes back.
GONE_RECHECK_S = 10.0
_REST_PATH = re.compile(r"^/endpoints/([^/]+)/(invocations|invocations-response-stream|"
                        r"openai/v1/chat/completions)$")
_REST_KINDS = {"invocations": "rest", "invocations-response-stream": "rest_stream",
               "openai/v1/chat/completions": "openai"}
OPENAI_CONTAINER_PATH = "/v1/chat/completions"
# Not forwarded: per-connection headers, and those the router rewrites.
_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Expect", "Server", "Date"))
_PIECE = 64 * 1024
_CREATE_MAX_BYTES = 256


@dataclass(frozen=True)
class Backend:
    """A replica the router forwards to."""

    name: str
    host: str
    port: int

    @classmethod
    def from_url(cls, url: str, name: str) -> Backend:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise ValueError(f"backend {url!r}: expected http://HOST:PORT")
        return cls(name, parts.hostname, parts.port or 80)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class ReplicaError(Exception):
    """A replica could not be reached or broke the connection: the router answers 5xx."""


@dataclass(frozen=True)
class Target:
    """Which of the router's paths a request came in on."""

    kind: str  # "container", "rest", "rest_stream" or "openai"
    endpoint: str | None = None  # the REST path's endpoint name

    @property
    def rest(self) -> bool:
        return self.kind != "container"

    @property
    def api(self) -> str:
        """Which SageMaker API's prefix-aware key applies."""
        return OPENAI_API if self.kind == "openai" else INVOKE_API


def target_of(path: str) -> Target | None:
    if path == "/invocations":
        return Target("container")
    match = _REST_PATH.match(path.split("?", 1)[0])
    if match is None:
        return None
    return Target(_REST_KINDS[match.group(2)], match.group(1))


class Router:
    """Forwards to ``backends`` by ``policy``, sessions by their table. Thread-safe; ``start``
    serves on a daemon thread, ``close`` stops it (replicas are their owner's to stop)."""

    def __init__(self, backends: Sequence[Backend], policy: Policy, host: str = "127.0.0.1",
                 port: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S,
                 endpoint_name: str | None = None, gone_recheck_s: float = GONE_RECHECK_S):
        if not backends:
            raise ValueError("a router needs at least one backend")
        self.backends = list(backends)
        self.endpoint_name = endpoint_name
        self.policy = policy
        self.timeout_s = timeout_s
        self.gone_recheck_s = gone_recheck_s
        self.sessions = SessionTable()
        self._outstanding = [0] * len(self.backends)
        # Replicas that refused a connection (scaled in, exited): when, by time.monotonic().
        self._gone: dict[int, float] = {}
        self._served = [0] * len(self.backends)
        self._lock = threading.Lock()
        handler = type("BoundRouterHandler", (RouterHandler,), {"router": self})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Router:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name="router")
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def served(self) -> list[int]:
        """Requests each replica has been sent (answered or not)."""
        with self._lock:
            return list(self._served)

    # ---------------------------------------------------------------- decisions

    def choose(self, body: bytes, headers: Any, api: str = INVOKE_API) -> int:
        """The replica index for a request: its session's, else the policy's."""
        session = headers.get(SESSION_HEADER)
        if session and session != NEW_SESSION:
            index = self.sessions.lookup(session.strip())
            if index is not None:
                return index
        held = self.sessions.by_replica()
        request = RouteRequest(body, headers.get(PREFIX_AWARE_HEADER),
                               is_create=session == NEW_SESSION or _create_body(body),
                               sessions_held=tuple(held.get(i, 0)
                                                   for i in range(len(self.backends))), api=api)
        with self._lock:
            outstanding, gone = list(self._outstanding), self._down()
        index = self.policy.choose(request, outstanding)
        if index in gone:  # as SageMaker stops routing to an instance it took away
            up = [i for i in range(len(self.backends)) if i not in gone]
            index = min(up, key=lambda i: outstanding[i]) if up else index
        return index

    def _down(self) -> set[int]:
        """The replicas marked gone within ``gone_recheck_s``. Under ``_lock``."""
        now = time.monotonic()
        return {i for i, since in self._gone.items() if now - since < self.gone_recheck_s}

    def mark_gone(self, index: int) -> None:
        """Replica ``index`` refused a connection: nothing listens there now (scaled in,
        drained, exited). New requests avoid it while another replica is up, for
        ``gone_recheck_s`` at a time; its sessions are unknown from now on (said once)."""
        with self._lock:
            fresh = index not in self._gone
            self._gone[index] = time.monotonic()
        if fresh:
            log.warning("replica %s (%s) is gone: no new requests go there; its sessions are "
                        "unknown", self.backends[index].name, self.backends[index].url)

    def is_gone(self, index: int) -> bool:
        with self._lock:
            return index in self._down()

    def answered(self, index: int) -> None:
        """Replica ``index`` answered: if it was gone, it is back (restarted) and takes new
        requests again (its old sessions stay unknown: a restarted server has none)."""
        with self._lock:
            back = self._gone.pop(index, None) is not None
        if back:
            log.warning("replica %s (%s) is back", self.backends[index].name,
                        self.backends[index].url)

    def observe(self, index: int, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """Record a created session (a 2xx answer naming a new session: with the
        ``NEW_SESSION`` header or without it, as the server allows), forget a closed one."""
        headers = list(headers)
        created = new_session_value(headers)
        if created is not None and 200 <= status < 300:
            try:
                session_id, _ = parse_new_session(created)
            except SessionError as exc:
                log.warning("replica %s answered a bad session id: %s",
                            self.backends[index].name, exc)
            else:
                self.sessions.record(session_id, index)
        for name, value in headers:
            if name.lower() == CLOSED_SESSION_HEADER.lower():
                self.sessions.forget(value.strip())

    # ---------------------------------------------------------------- forwarding

    def begin(self, index: int) -> None:
        with self._lock:
            self._outstanding[index] += 1
            self._served[index] += 1

    def end(self, index: int) -> None:
        with self._lock:
            self._outstanding[index] -= 1

    def open(self, index: int, method: str, path: str, body: bytes | None,
             headers: list[tuple[str, str]], timeout_s: float | None = None) -> \
            tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the request to replica ``index``; its response with headers read. Raises
        ReplicaError naming the replica for any connection failure or a silence longer than
        ``timeout_s`` (default the router's)."""
        backend = self.backends[index]
        timeout_s = timeout_s or self.timeout_s
        conn = http.client.HTTPConnection(backend.host, backend.port, timeout=timeout_s)
        try:
            conn.sock = socket.create_connection((backend.host, backend.port),
                                                 timeout=min(CONNECT_TIMEOUT_S, timeout_s))
            conn.sock.settimeout(timeout_s)
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", f"{backend.host}:{backend.port}")
            for name, value in headers:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            return conn, conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ReplicaError(f"replica {backend.name} ({backend.url}): "
                               f"{type(exc).__name__}: {exc or 'no answer'}") from exc


def _create_body(body: bytes) -> bool:
    """Whether ``body`` is a create (which the server also takes without the header); a create
    is a few bytes, so longer bodies are not parsed."""
    if len(body) > _CREATE_MAX_BYTES or REQUEST_TYPE.encode() not in body:
        return False
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get(REQUEST_TYPE) == NEW_SESSION


def forwarded(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers less the per-connection ones."""
    return [(name, value) for name, value in headers if name.lower() not in _HOP]


def new_session_value(headers: Iterable[tuple[str, str]]) -> str | None:
    """The ``<id>; Expires=...`` a container's answer gives a new session, or None. A container
    names it in ``X-Amzn-SageMaker-Session-Id`` (LMI's create answer: djl-serving 7e13b08,
    ``djl_python/session_utils.py`` lines 21 and 37-40, the only header LMI sends; AWS's
    stateful-sessions guide has the container answer that header); the built-in server also
    sends ``X-Amzn-SageMaker-New-Session-Id``, the header botocore reads as ``NewSessionId``.
    A ``Session-Id`` value without ``Expires=`` names no new session."""
    found = {name.lower(): value for name, value in headers}
    if NEW_SESSION_HEADER.lower() in found:
        return found[NEW_SESSION_HEADER.lower()]
    value = found.get(SESSION_HEADER.lower())
    return value if value is not None and "expires=" in value.lower() else None


def _model_error(status: int, body: bytes) -> dict[str, Any]:
    """SageMaker's ModelError body for a container's non-2xx answer."""
    text = body.decode("utf-8", "replace")
    kind = "client" if status < 500 else "server"
    return {"ErrorCode": f"{kind.upper()}_ERROR_FROM_MODEL", "OriginalStatusCode": status,
            "OriginalMessage": text,
            "Message": f"Received {kind} error ({status}) from model with message \"{text}\"."}


class RouterHandler(BaseHTTPRequestHandler):
    router: Router  # set on the subclass Router makes
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path != "/ping":
            self._error(Target("container"), 404, f"no route {self.path}")
            return
        healthy = []
        for index, backend in enumerate(self.router.backends):
            try:
                conn, response = self.router.open(index, "GET", "/ping", None, [],
                                                  timeout_s=CONNECT_TIMEOUT_S)
                response.read()
                conn.close()
                if response.status == 200:
                    healthy.append(backend.name)
            except ReplicaError as exc:
                log.warning("ping: %s", exc)
        status = 200 if healthy else 502
        body = {"status": "healthy" if healthy else "no healthy replica", "healthy": healthy,
                "replicas": len(self.router.backends)}
        self._send(status, json.dumps(body).encode(), [("Content-Type", "application/json")])

    def do_POST(self) -> None:  # noqa: N802
        target = target_of(self.path)
        if target is None:
            self._error(Target("container"), 404, f"no route {self.path}")
            return
        refusal = self._refusal(target)
        if refusal is not None:
            self.close_connection = True  # the body stays unread
            self._error(target, 400, refusal)
            return
        body = self._read_body(target)
        if body is None:
            return
        attempts = len(self.router.backends) + 1  # another replica while one is gone
        for attempt in range(attempts):
            index = self.router.choose(body, self.headers, target.api)
            if self._session_gone(target, index):
                return
            self.router.begin(index)
            try:
                if self._forward(target, index, body, last=attempt == attempts - 1):
                    return
            finally:
                self.router.end(index)

    def _session_gone(self, target: Target, index: int) -> bool:
        """A request naming a session of a replica that is gone: answer 400 "unknown" (a
        client such as ``lmcache_ext.client`` creates a new session and resends the history,
        which the shared tier may hold). True when answered."""
        session = (self.headers.get(SESSION_HEADER) or "").strip()
        if not session or session == NEW_SESSION or not self.router.is_gone(index) or \
                self.router.sessions.lookup(session) != index:
            return False
        self.router.sessions.forget(session)
        self._error(target, 400, f"session {session} is unknown: replica "
                                 f"{self.router.backends[index].name} is gone; create a new one")
        return True

    def _refusal(self, target: Target) -> str | None:
        """Why SageMaker would refuse this REST request before any model sees it, if it
        would."""
        name = self.router.endpoint_name
        if target.rest and name is not None and target.endpoint != name:
            return f"Endpoint {target.endpoint} not found (this endpoint is {name})."
        if target.kind == "rest_stream" and self.headers.get(SESSION_HEADER) == NEW_SESSION:
            return ("A session cannot be created with InvokeEndpointWithResponseStream: create "
                    "it with InvokeEndpoint (SessionId NEW_SESSION).")
        return None

    def _read_body(self, target: Target) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(target, 411, "Content-Length: required")
            return None
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(target, 413, f"body of {length} bytes is over {MAX_BODY_BYTES}")
            return None
        return self.rfile.read(int(length))

    def _forward(self, target: Target, index: int, body: bytes, last: bool) -> bool:
        """Send to replica ``index`` and relay its answer; False (nothing answered) when the
        replica refused the connection and, not being the ``last`` attempt, another may take
        the request."""
        headers = forwarded(self.headers.items())
        if target.kind == "rest_stream":
            headers = [("Accept", v) if n.lower() == STREAM_ACCEPT_HEADER.lower() else (n, v)
                       for n, v in headers]
        path = OPENAI_CONTAINER_PATH if target.kind == "openai" else "/invocations"
        try:
            conn, response = self.router.open(index, "POST", path, body, headers)
        except ReplicaError as exc:
            if isinstance(exc.__cause__, ConnectionRefusedError) and not last:
                self.router.mark_gone(index)
                return False  # try again: its session is now unknown, others go elsewhere
            log.warning("%s", exc)
            self._error(target, 502, str(exc))
            return True
        self.router.answered(index)
        try:
            self.router.observe(index, response.status, response.getheaders())
            if target.kind in ("container", "openai"):
                self._relay(target, index, response)
            elif target.kind == "rest":
                self._relay_rest(index, response)
            else:
                self._relay_rest_stream(index, response)
        finally:
            conn.close()
        return True

    def _reply_headers(self, index: int, response: http.client.HTTPResponse) -> list:
        return forwarded(response.getheaders()) + [(REPLICA_HEADER,
                                                    self.router.backends[index].name)]

    def _relay(self, target: Target, index: int, response: http.client.HTTPResponse) -> None:
        headers = self._reply_headers(index, response)
        if response.chunked:
            self._stream(index, response.status, headers, response, lambda piece: piece, None)
            return
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._error(target, 502, self._broken(index, exc))
            return
        self._send(response.status, data, headers)

    def _relay_rest(self, index: int, response: http.client.HTTPResponse) -> None:
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._error(Target("rest"), 502, self._broken(index, exc))
            return
        if 200 <= response.status < 300:
            headers = self._reply_headers(index, response)
            created = new_session_value(headers)
            if created is not None and not any(n.lower() == NEW_SESSION_HEADER.lower()
                                               for n, _ in headers):
                headers.append((NEW_SESSION_HEADER, created))  # SageMaker's NewSessionId
            self._send(200, data, headers + [(VARIANT_HEADER, VARIANT_NAME)])
            return
        self._send(424, json.dumps(_model_error(response.status, data)).encode(),
                   [("Content-Type", "application/json"), (ERROR_TYPE_HEADER, "ModelError"),
                    (REPLICA_HEADER, self.router.backends[index].name)])

    def _relay_rest_stream(self, index: int, response: http.client.HTTPResponse) -> None:
        if not 200 <= response.status < 300:
            self._relay_rest(index, response)  # an error before the stream: a ModelError
            return
        headers = [(STREAM_CONTENT_TYPE_HEADER, v) if n.lower() == "content-type" else (n, v)
                   for n, v in self._reply_headers(index, response)]
        headers += [("Content-Type", eventstream.CONTENT_TYPE), (VARIANT_HEADER, VARIANT_NAME)]
        self._stream(index, 200, headers, response, eventstream.payload_part,
                     eventstream.model_stream_error)

    def _stream(self, index: int, status: int, headers: list,
                response: http.client.HTTPResponse, frame: Callable[[bytes], bytes],
                broken: Callable[[str], bytes] | None) -> None:
        """Relay ``response``'s body piece by piece as a chunked answer, each piece through
        ``frame``. A replica failing mid-stream: ``broken(message)`` (if any) is sent, then the
        answer ends without its last chunk: the client sees a broken stream, not a short
        success."""
        self.send_response(status, HTTPStatus(status).phrase)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while piece := response.read1(_PIECE):
                self._chunk(frame(piece))
        except (OSError, http.client.HTTPException) as exc:
            message = self._broken(index, exc)
            log.warning("%s", message)
            if broken is not None:
                self._chunk(broken(message))
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")

    def _broken(self, index: int, exc: Exception) -> str:
        backend = self.router.backends[index]
        return f"replica {backend.name} ({backend.url}) broke off its answer: " \
               f"{type(exc).__name__}: {exc}"

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _error(self, target: Target, status: int, message: str) -> None:
        if not target.rest:
            self._send(status, json.dumps({"error": message}).encode(),
                       [("Content-Type", "application/json")])
            return
        kind = {502: "ServiceUnavailable", 400: "ValidationError", 404: "ValidationError",
                411: "ValidationError", 413: "ValidationError"}.get(status, "InternalFailure")
        rest_status = 503 if kind == "ServiceUnavailable" else 400 if kind == \
            "ValidationError" else 500
        self._send(rest_status, json.dumps({"message": message}).encode(),
                   [("Content-Type", "application/json"), (ERROR_TYPE_HEADER, kind)])

    def _send(self, status: int, data: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
