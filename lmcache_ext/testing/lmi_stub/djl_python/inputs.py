"""LMI's ``Input`` as a handler uses it (see the package doc)."""

from __future__ import annotations

import json
from typing import Any


class PairList:
    """Ordered (key, value) pairs, as LMI's ``PairList``."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []
        self.values: list[Any] = []

    def add(self, key: str | None = None, value: Any = None) -> None:
        self.keys.append(key)
        self.values.append(value)

    def get(self, key: str) -> Any:
        return self.values[self.keys.index(key)] if key in self.keys else None

    def get_keys(self) -> list[str | None]:
        return self.keys

    def get_values(self) -> list[Any]:
        return self.values

    def size(self) -> int:
        return len(self.keys)

    def is_empty(self) -> bool:
        return not self.keys


class Input:
    def __init__(self, properties: dict[str, str] | None = None, body: bytes | None = None):
        self.properties: dict[str, str] = dict(properties or {})
        self.content = PairList()
        if body is not None:
            self.content.add("data", bytearray(body))

    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str) -> str | None:
        """Case-insensitive, as LMI's (headers arrive in any case)."""
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
        value = self.content.get(key or "data")
        return value if value is not None else self.content.values[0]

    def get_as_json(self, key: str | None = None) -> Any:
        return json.loads(bytes(self.get_as_bytes(key)).decode("utf-8"))
