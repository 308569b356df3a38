"""A small real HTTP server that speaks the container's session protocol without a model, for
router and client tests that need many replicas but no generation.

It answers ``/invocations`` as the built-in server does in shape: a create (``NEW_SESSION``)
with ``<id>; Expires=...`` in both session headers (``lmi_headers``: only in
``X-Amzn-SageMaker-Session-Id``, as LMI answers it), a close with the closed id, a request with an
unknown or expired session with 400 naming the state, and any other body with a chat answer
(whole, or streamed JSON lines) whose text names the replica and the message count. Request
headers named ``X-Test-*`` and ``X-Amzn-SageMaker-Custom-Attributes`` come back in the answer
(to see headers pass through a router). ``hold()`` keeps inference answers waiting until
``release()`` (requests in flight, for routing by load). Every request is recorded. Thread-safe.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lmcache_ext.sessions.protocol import (
    CLOSE,
    CLOSED_SESSION_HEADER,
    NEW_SESSION,
    NEW_SESSION_HEADER,
    SESSION_HEADER,
    SessionError,
    check_session_id,
    format_new_session,
    new_session_id,
    parse_session_request,
)

ECHO_PREFIX = "x-test-"
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"  # botocore's CustomAttributes
HOLD_LIMIT_S = 60.0  # a held request waits at most this long (a test that forgot to release)


@dataclass(frozen=True)
class Seen:
    """One request the replica received."""

    session: str | None
    body: dict[str, Any]
    headers: dict[str, str]


class SessionReplica:
    """``start()`` serves on ``port`` (0: a free loopback port); ``expire(id)`` ends a session
    as its expiry would; ``close()`` stops the server."""

    def __init__(self, name: str, expiry_s: float = 1200.0, host: str = "127.0.0.1",
                 lmi_headers: bool = False, port: int = 0):
        self.name = name
        self.expiry_s = expiry_s
        # LMI answers a create in X-Amzn-SageMaker-Session-Id only (djl-serving 7e13b08,
        # djl_python/session_utils.py lines 37-40); the built-in server sends both headers.
        self.create_headers = (SESSION_HEADER,) if lmi_headers else (NEW_SESSION_HEADER,
                                                                       SESSION_HEADER)
        self.seen: list[Seen] = []
        self._expires: dict[str, float] = {}  # open session -> epoch seconds
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._held = threading.Semaphore(0)
        handler = type("BoundReplicaHandler", (_Handler,), {"replica": self})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> SessionReplica:
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True,
                         name=self.name).start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def expire(self, session_id: str) -> None:
        with self._lock:
            self._expires[session_id] = 0.0

    def hold(self) -> None:
        """Inference answers wait from now on, until ``release``."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def wait_held(self) -> None:
        """Block until one more inference request is waiting (after ``hold``)."""
        if not self._held.acquire(timeout=HOLD_LIMIT_S):
            raise TimeoutError(f"{self.name}: no request arrived to hold")

    def open_sessions(self) -> set[str]:
        with self._lock:
            return {s for s, at in self._expires.items() if at > time.time()}

    def inferences(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if "messages" in s.body]

    # ---------------------------------------------------------------- protocol

    def answer(self, session: str | None, body: dict[str, Any]) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) for one request; SessionError for a session problem."""
        request = parse_session_request(body)
        with self._lock:
            if request is not None and request.request_type == NEW_SESSION:
                if session != NEW_SESSION:
                    raise SessionError(f"{SESSION_HEADER}: a create needs {NEW_SESSION!r}")
                session_id = new_session_id()
                self._expires[session_id] = time.time() + self.expiry_s
                value = format_new_session(session_id, self._expires[session_id])
                return 200, {name: value for name in self.create_headers}, {}
            if session and session != NEW_SESSION:
                self._check(check_session_id(session))
            if request is not None and request.request_type == CLOSE:
                if not session or session == NEW_SESSION:
                    raise SessionError(f"{SESSION_HEADER}: a close needs a session id")
                del self._expires[session]
                return 200, {CLOSED_SESSION_HEADER: session}, {}
        if not self._open.is_set():
            self._held.release()
            self._open.wait(HOLD_LIMIT_S)
        count = len(body.get("messages") or [])
        return 200, {}, {"object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": f"{self.name}:{count}"}}],
            "usage": {"prompt_tokens": count, "prompt_tokens_details": {"cached_tokens": 0}}}

    def _check(self, session_id: str) -> None:
        expires = self._expires.get(session_id)
        if expires is None:
            raise SessionError(f"{SESSION_HEADER}: session {session_id} is unknown")
        if expires <= time.time():
            del self._expires[session_id]
            raise SessionError(f"{SESSION_HEADER}: session {session_id} has expired")


class _Handler(BaseHTTPRequestHandler):
    replica: SessionReplica
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._send(200 if self.path == "/ping" else 404, {}, {"status": "healthy"})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        session = self.headers.get(SESSION_HEADER)
        with self.replica._lock:
            self.replica.seen.append(Seen(session, body, dict(self.headers.items())))
        echo = {k: v for k, v in self.headers.items()
                if k.lower().startswith(ECHO_PREFIX) or k.lower() == CUSTOM_ATTRIBUTES.lower()}
        try:
            status, headers, answer = self.replica.answer(session, body)
        except SessionError as exc:
            self._send(exc.status, echo, {"error": str(exc)})
            return
        if body.get("stream") and "choices" in answer:
            self._stream({**headers, **echo}, answer)
        else:
            self._send(status, {**headers, **echo}, answer)

    def _stream(self, headers: dict[str, str], answer: dict[str, Any]) -> None:
        self.send_response(200)
        for name, value in {**headers, "Content-Type": "application/jsonlines",
                            "Transfer-Encoding": "chunked"}.items():
            self.send_header(name, value)
        self.end_headers()
        text = answer["choices"][0]["message"]["content"]
        lines = [{"choices": [{"index": 0, "delta": {"content": piece}}]}
                 for piece in (text[:len(text) // 2], text[len(text) // 2:])]
        lines[-1]["usage"] = answer["usage"]
        for line in lines:
            data = json.dumps(line).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _send(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json",
                            "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
