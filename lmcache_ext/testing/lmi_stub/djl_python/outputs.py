"""LMI's ``Output`` as the async service builds it (see the package doc): the HTTP code, the
response headers (``properties``) and the body."""

from __future__ import annotations

import json
from typing import Any


class Output:
    def __init__(self, code: int = 200, message: str = "OK"):
        self.code = code
        self.message = message
        self.properties: dict[str, str] = {}
        self.body: Any = None

    def add_property(self, key: str, value: str) -> Output:
        self.properties[key] = value
        return self

    def add(self, value: Any) -> Output:
        self.body = value
        return self

    def add_as_json(self, value: Any, key: str | None = None) -> Output:
        """The body as JSON (LMI's encodes it; the stand-in keeps what a client decodes)."""
        return self.add(json.loads(json.dumps(value)))

    @staticmethod
    def json(data: Any, code: int = 200, properties: dict[str, str] | None = None) -> Output:
        """A JSON answer (LMI's ``create_non_stream_output``: an error carries its code)."""
        output = Output(code).add(json.loads(json.dumps(data)))
        output.add_property("Content-Type", "application/json")
        for key, value in (properties or {}).items():
            output.add_property(key, value)
        return output
