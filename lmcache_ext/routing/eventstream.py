"""AWS event-stream framing (``application/vnd.amazon.eventstream``), as SageMaker's
``InvokeEndpointWithResponseStream`` answers: each piece of the container's streamed body is a
``PayloadPart`` event; a failure after the headers went out is a ``ModelStreamError`` exception.

A message: total length (u32), headers length (u32), CRC32 of those 8 bytes, headers, payload,
CRC32 of everything before it; big-endian. A header: name length (u8), name, value type (u8;
7 = string), value length (u16), value. botocore's own parser reads what this writes.
"""

from __future__ import annotations

import json
import struct
import zlib

CONTENT_TYPE = "application/vnd.amazon.eventstream"
_STRING = 7
_PRELUDE = struct.Struct(">II")


def _headers(values: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in values.items():
        raw_name, raw_value = name.encode(), value.encode()
        out += struct.pack(">B", len(raw_name)) + raw_name
        out += struct.pack(">BH", _STRING, len(raw_value)) + raw_value
    return bytes(out)


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message."""
    raw_headers = _headers(headers)
    total = _PRELUDE.size + 4 + len(raw_headers) + len(payload) + 4
    prelude = _PRELUDE.pack(total, len(raw_headers))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw_headers + payload
    return body + struct.pack(">I", zlib.crc32(body))


def payload_part(data: bytes) -> bytes:
    """A ``PayloadPart`` event carrying ``data``."""
    return encode_message({":event-type": "PayloadPart", ":message-type": "event",
                           ":content-type": "application/octet-stream"}, data)


def model_stream_error(message: str, code: str = "StreamBroken") -> bytes:
    """A ``ModelStreamError`` exception: the stream broke after it began."""
    return encode_message({":exception-type": "ModelStreamError", ":message-type": "exception",
                           ":content-type": "application/json"},
                          json.dumps({"Message": message, "ErrorCode": code}).encode())
