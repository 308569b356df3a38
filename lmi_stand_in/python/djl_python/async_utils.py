"""LMI's answers in async mode (djl_python/async_utils.py at the commit the package doc names,
lines 23-78): ``create_non_stream_output`` binary-encodes ``{"data": <JSON or text> + "\\n",
"last": True}`` with ``error`` and ``code`` added when given, so an error is in-band: the
``Output`` itself stays 200 and DJL's Java side turns ``code`` into the HTTP status."""

from __future__ import annotations

import json
from typing import Any

from djl_python.outputs import Output


def create_non_stream_output(data: str | dict, properties: dict | None = None,
                             error: str | None = None, code: int | None = None) -> Output:
    return _create_output(data, True, "application/json", properties, error, code)


def create_stream_chunk_output(data: str | dict, last_chunk: bool, error: str | None = None,
                               code: int | None = None) -> Output:
    return _create_output(data, last_chunk, "application/jsonlines", None, error, code)


def _create_output(data: str | dict, last: bool, content_type: str, properties: dict | None,
                   error: str | None, code: int | None) -> Output:
    text = json.dumps(data, ensure_ascii=False) if isinstance(data, dict) else data
    answer: dict[str, Any] = {"data": text + "\n", "last": last}
    if error:
        answer["error"] = error
    if code:
        answer["code"] = code
    output = Output().add_property("Content-Type", content_type)
    for key, value in (properties or {}).items():
        output.add_property(key, value)
    return output.add(Output.binary_encode(answer))
