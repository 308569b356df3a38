"""LMI's ``Input`` (djl_python/inputs.py at the commit the package doc names).

- ``Input()`` takes no arguments (lines 75-78); DJL's Python engine fills it from the socket with
  ``read`` (lines 220-236: a short count of UTF-8 properties, then a short count of content
  entries, each a key and an int-length byte array; the ``handler`` property names the function).
- ``get_property`` is case-insensitive (lines 136-146); ``get_as_bytes`` reads ``data``, else the
  first entry, and raises KeyError for a missing named key (lines 169-184).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from djl_python.pair_list import PairList


def _exactly(conn: Any, length: int) -> bytearray:
    data = bytearray()
    while length > 0:
        chunk = conn.recv(length)
        if not chunk:
            raise ValueError("Connection disconnected")
        data += chunk
        length -= len(chunk)
    return data


def _int(conn: Any) -> int:
    return struct.unpack(">i", _exactly(conn, 4))[0]


def _utf8(conn: Any) -> str | None:
    length = _int(conn)
    return None if length < 0 else _exactly(conn, length).decode("utf8")


class Input:
    def __init__(self) -> None:
        self.function_name: str | None = None
        self.properties: dict[str, Any] = {}
        self.content = PairList()

    def read(self, conn: Any) -> None:
        """One request from DJL's socket (anything with ``recv``)."""
        for _ in range(struct.unpack(">h", _exactly(conn, 2))[0]):
            key = _utf8(conn)
            self.properties[key] = _utf8(conn)
        for _ in range(struct.unpack(">h", _exactly(conn, 2))[0]):
            key = _utf8(conn)
            self.content.add(key, _exactly(conn, _int(conn)))
        self.function_name = self.properties.get("handler")

    def get_function_name(self) -> str | None:
        return self.function_name

    def get_properties(self) -> dict[str, Any]:
        return self.properties

    def get_property(self, key: str) -> Any:
        return next((v for k, v in self.properties.items() if k.lower() == key.lower()), None)

    def get_content(self) -> PairList:
        return self.content

    def is_batch(self) -> bool:
        return "batch_size" in self.properties

    def get_batches(self) -> list[Input]:
        if self.is_batch():
            raise NotImplementedError("the stand-in serves one request at a time")
        return [self]

    def is_empty(self) -> bool:
        return self.content.is_empty()

    def get_as_bytes(self, key: str | None = None) -> bytearray | None:
        if self.content.is_empty():
            return None
        if key:
            value = self.content.get(key)
            if value is None:
                raise KeyError(f"requested data for key:{key} is not found!")
            return value
        value = self.content.get("data")
        return value if value is not None else self.content.value_at(0)

    def get_as_string(self, key: str | None = None) -> str:
        return bytes(self.get_as_bytes(key)).decode("utf-8")

    def get_as_json(self, key: str | None = None) -> Any:
        return json.loads(self.get_as_string(key))
