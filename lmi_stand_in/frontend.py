"""DJL Serving's Java side as far as LMI's Python worker sees it, for tests: how a request becomes
the worker's ``Input`` and how the worker's ``Output`` becomes the HTTP answer. Modelled on
djl-serving at commit 7e13b081383bd46293d4b49ab214d4757b1effd5 (LMI lmi27), written for this
project (read, not copied):

- ``request_properties``: ``serving/.../http/RequestParser.java`` lines 63-76: every header
  becomes a property, except ``X-Amzn-SageMaker-Custom-Attributes``, which is split on ``;``
  into ``key=value`` properties (trimmed); an item without ``=`` is dropped, and the header
  itself is not passed on. The body is the content entry ``data``.
- ``encode_request``: ``engines/python/.../Connection.java`` lines 495-520 (``RequestEncoder``):
  a big-endian short count of properties (UTF-8 key and value, each an int length and bytes),
  a short count of content entries (key, int length, bytes). ``PyProcess.java`` lines 130-135
  add the ``handler`` property (the function to call).
- ``decode_output``: ``Connection.java`` lines 537-575 (``OutputDecoder``): code, message,
  properties, content entries (a content count of -1 starts a stream, not modelled here).
- ``http_answer``: ``AsyncRequestManager.java`` lines 74-135 and ``Request.java`` lines 89-147:
  in async mode a non-200 ``Output`` is an error answer; a 200 one's first content entry is
  read as ``Output.binary_encode`` of ``data``/``last``/``code``/``error``, and ``code`` (an
  in-band error) becomes the HTTP status with ``{"code", "error"}`` as the body. Content that is
  not such an encoding makes Java's decoder throw: the connection closes and DJL restarts the
  Python worker (``Connection.java``, ``PyProcess.restartPythonWorkerAsyncMode``): here
  ``WorkerRestart``.
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass, field
from typing import Any

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
TRACKING_ID = "request_tracking_id"  # AsyncRequestManager.REQUEST_TRACKING_ID
HANDLER = "handler"


class WorkerRestart(Exception):
    """What DJL's Java side does with an answer it cannot decode: it drops the connection and
    restarts LMI's Python worker (every request in flight fails)."""


@dataclass(frozen=True)
class RawOutput:
    """An ``Output`` as Java's ``OutputDecoder`` reads it off the socket."""

    code: int
    message: str | None
    properties: dict[str, str]
    content: list[tuple[str | None, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class HttpAnswer:
    """What the client gets: the status, the headers (the ``Output``'s properties) and body."""

    code: int
    headers: dict[str, str]
    body: bytes


def request_properties(headers: dict[str, str]) -> dict[str, str]:
    """The properties DJL makes of a request's headers (custom attributes split)."""
    properties: dict[str, str] = {}
    for key, value in headers.items():
        if key.lower() != CUSTOM_ATTRIBUTES.lower():
            properties[key] = value
            continue
        for token in value.split(";"):
            pair = token.split("=", 1)
            if len(pair) == 2:
                properties[pair[0].strip()] = pair[1].strip()
    return properties


def _utf8(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">i", -1)
    data = value.encode("utf-8")
    return struct.pack(">i", len(data)) + data


def encode_request(properties: dict[str, str], content: list[tuple[str, bytes]]) -> bytes:
    """One request on DJL's socket."""
    out = bytearray(struct.pack(">h", len(properties)))
    for key, value in properties.items():
        out += _utf8(key) + _utf8(str(value))
    out += struct.pack(">h", len(content))
    for key, value in content:
        out += _utf8(key) + struct.pack(">i", len(value)) + value
    return bytes(out)


def http_request(headers: dict[str, str], body: bytes) -> bytes:
    """A client's request as DJL hands it to the Python worker's ``handle``."""
    return encode_request({**request_properties(headers), HANDLER: "handle"}, [("data", body)])


class _Reader:
    def __init__(self, data: bytes):
        self._buffer = io.BytesIO(data)
        self._size = len(data)

    def recv(self, length: int) -> bytes:
        return self._buffer.read(length)

    def exact(self, length: int) -> bytes:
        if length < 0 or self._buffer.tell() + length > self._size:
            raise WorkerRestart(f"cannot read {length} bytes at {self._buffer.tell()} of "
                                f"{self._size}: the answer is not DJL's encoding")
        return self._buffer.read(length)

    def short(self) -> int:
        return struct.unpack(">h", self.exact(2))[0]

    def int(self) -> int:
        return struct.unpack(">i", self.exact(4))[0]

    def utf8(self) -> str | None:
        length = self.int()
        return None if length < 0 else self.exact(length).decode("utf-8")


def reader(data: bytes) -> _Reader:
    """``data`` as a socket the Python side's ``Input.read`` reads from."""
    return _Reader(data)


def decode_output(data: bytes) -> RawOutput:
    """One non-streamed ``Output`` as ``Output.send`` wrote it."""
    src = _Reader(data)
    code, message = src.short(), src.utf8()
    properties = {src.utf8(): src.utf8() for _ in range(src.short())}
    count = src.short()
    if count < 0:
        raise NotImplementedError("a streamed Output: not modelled by the stand-in front end")
    content = [(src.utf8(), src.exact(src.int())) for _ in range(count)]
    return RawOutput(code, message, properties, content)


def binary_decode(data: bytes) -> dict[str, str]:
    """``Output.binary_encode``'s dict, read as ``Request.addResponse`` reads it (a null key or
    value, or a short or long read, is Java's exception: ``WorkerRestart``)."""
    src = _Reader(data)
    found: dict[str, str] = {}
    for _ in range(src.short()):
        key, value = src.utf8(), src.utf8()
        if key is None or value is None:
            raise WorkerRestart("a null key or value in the answer")
        found[key] = value
    return found


def http_answer(output: RawOutput) -> HttpAnswer:
    """The client's answer to one non-streamed ``Output`` in async mode."""
    headers = {k: v for k, v in output.properties.items() if k != TRACKING_ID}
    if output.code != 200:
        error = {"code": output.code, "message": f"Async Inference Failure {output.message}"}
        return HttpAnswer(output.code, headers, json.dumps(error).encode())
    if not output.content:
        raise WorkerRestart("an Output without content")
    answer = binary_decode(output.content[0][1])
    if "code" in answer:
        error = {"code": int(answer["code"])}
        if "error" in answer:
            error["error"] = answer["error"]
        return HttpAnswer(int(answer["code"]), headers, json.dumps(error).encode())
    return HttpAnswer(200, headers, answer.get("data", "").encode("utf-8"))


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def sendall(self, data: bytes) -> None:
        self.data += data


def answer_of(output: Any) -> HttpAnswer:
    """The client's answer to a Python ``Output`` (sent as LMI's engine sends it, then decoded
    as Java decodes it); None from ``handle`` is LMI's 204."""
    if output is None:
        return HttpAnswer(204, {}, b"")
    sink = _Sink()
    output.send(sink)
    return http_answer(decode_output(bytes(sink.data)))
