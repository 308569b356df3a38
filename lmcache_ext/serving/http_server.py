"""The SageMaker container contract over HTTP: ``/ping``, ``/invocations``, ``/metrics``, the
OpenAI-style ``/v1/completions`` and ``/v1/chat/completions``, and ``/lookup``. Routing and HTTP
only: parsing and response bodies are ``protocol``'s, tokenising and generation ``service``'s.

A thread per connection (the standard library's ``ThreadingHTTPServer``): ``/ping`` and
``/metrics`` answer at once while another thread generates, since torch releases the GIL inside
its kernels. Streaming: ``/invocations`` writes JSON lines (``application/jsonlines``) as LMI
does; the ``/v1`` routes write server-sent events as OpenAI clients expect. SageMaker's stateful
sessions (create, close, a session's turns) are spoken on ``/invocations`` (``sessions``).

A lookup (``/lookup``, or ``/invocations`` whose custom attributes name ``lmcache-ext-lookup``:
the one way through SageMaker) takes any payload ``/invocations`` takes and answers how many of
its prompt's leading tokens the cache holds, without generating, storing or counting a lookup in
the engine's hit metrics; it is counted in the HTTP requests under the route ``/lookup``. A
session header on a lookup is ignored (it neither begins a turn nor slides the expiry).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import generate_latest

from lmcache_ext.serving.generator import GenerationStats, TokenEvent
from lmcache_ext.serving.protocol import (
    GenerateRequest,
    RequestError,
    decode_body,
    format_event,
    format_full,
    parse_chat,
    parse_completions,
    parse_invocation,
)
from lmcache_ext.serving.service import Service
from lmcache_ext.sessions.protocol import SESSION_HEADER, SessionError, parse_session_request
from lmcache_ext.wire import (
    CUSTOM_ATTRIBUTES_HEADER,
    LOOKUP_ROUTE,
    MAX_BODY_BYTES,
    format_lookup,
    wants_lookup,
)

log = logging.getLogger(__name__)

ROUTES: dict[str, Callable[[dict[str, Any]], GenerateRequest]] = {
    "/invocations": parse_invocation,
    "/v1/completions": parse_completions,
    "/v1/chat/completions": parse_chat,
    LOOKUP_ROUTE: parse_invocation,
}


class Handler(BaseHTTPRequestHandler):
    service: Service  # set on the subclass made by make_server
    protocol_version = "HTTP/1.1"
    _route = ""  # the request's route in the metrics (a lookup on /invocations is /lookup's)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._route = self.path
        if self.path == "/ping":
            self._send_json(200, {"status": "healthy"})
        elif self.path == "/metrics":
            self._send(200, generate_latest(self.service.metrics.registry),
                       "text/plain; version=0.0.4")
        else:
            self._send_json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        with self.service.in_flight:  # a drain lets it finish before the process exits
            self._post()

    def _post(self) -> None:
        parse = ROUTES.get(self.path)
        attributes = self.headers.get(CUSTOM_ATTRIBUTES_HEADER)
        lookup = self.path == LOOKUP_ROUTE or (self.path == "/invocations" and
                                               wants_lookup(attributes))
        self._route = LOOKUP_ROUTE if lookup else self.path
        if parse is None:
            self._send_json(404, {"error": f"no route {self.path}"})
            return
        try:
            body = decode_body(self._read_body())
            if lookup:
                self._lookup(parse_invocation(body))
                return
            session_id = None
            if self.path == "/invocations":  # SageMaker's sessions live on /invocations only
                header = self.headers.get(SESSION_HEADER)
                if (session_request := parse_session_request(body)) is not None:
                    reply = self.service.sessions.handle(session_request, header)
                    self._send_json(reply.status, reply.body, reply.headers)
                    return
                request = parse(body)
                session_id = self.service.sessions.begin_turn(header)
            else:
                request = parse(body)
            events, stats = self.service.run(request, session_id)
            if request.stream:
                self._stream(request, events, stats)
            else:
                for _ in events:
                    pass
                self._observe_ttft(stats)
                self._send_json(200, format_full(request, stats, self.service.model_name))
        except (RequestError, SessionError) as exc:
            self._send_json(exc.status, {"error": str(exc)})
        except Exception as exc:  # the request fails; the server keeps serving
            log.exception("request to %s failed", self.path)
            self._send_json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    def _lookup(self, request: GenerateRequest) -> None:
        prompt_tokens, cached_tokens = self.service.lookup(request)
        self._send_json(200, format_lookup(prompt_tokens, cached_tokens,
                                           self.service.generator.chunk_size))

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("Content-Length: required", status=411)
        if int(length) > MAX_BODY_BYTES:
            # Read a moderately large body so the client, still sending, gets the 413 instead of
            # a broken pipe; a huge one is not read at all. Either way the connection closes.
            if int(length) <= 4 * MAX_BODY_BYTES:
                self.rfile.read(int(length))
            self.close_connection = True
            raise RequestError(f"body of {length} bytes is over {MAX_BODY_BYTES}", status=413)
        return self.rfile.read(int(length))

    def _stream(self, request: GenerateRequest, events: Iterator[TokenEvent],
                stats: GenerationStats) -> None:
        sse = self.path.startswith("/v1/")  # OpenAI routes: SSE; /invocations: JSON lines
        first = next(events)  # errors before the first token still get a proper status
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if sse else "application/jsonlines")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._observe_ttft(stats)
        model = self.service.model_name
        try:
            for event in _chain(first, events):
                line = json.dumps(format_event(request, event, stats, model))
                self._chunk(f"data: {line}\n\n" if sse else line + "\n")
        except Exception as exc:  # headers are out: end the stream with the error, then close
            log.exception("stream to %s failed", self.path)
            line = json.dumps({"error": f"internal error: {type(exc).__name__}: {exc}"})
            self._chunk(f"data: {line}\n\n" if sse else line + "\n")
        if sse:
            self._chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.service.metrics.requests.labels(self._route, "200").inc()

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _observe_ttft(self, stats: GenerationStats) -> None:
        self.service.metrics.ttft.observe(stats.ttft_s)

    def _send_json(self, status: int, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> None:
        # Counted first: a client that has the answer sees it counted (tests read the counter).
        self.service.metrics.requests.labels(self._route, str(status)).inc()
        self._send(status, json.dumps(body).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _chain(first: TokenEvent, rest: Iterator[TokenEvent]) -> Iterator[TokenEvent]:
    yield first
    yield from rest


def make_server(service: Service, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
