"""LMI's ``PairList`` (djl_python/pair_list.py): ordered (key, value) pairs."""

from __future__ import annotations

from typing import Any


class PairList:
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

    def key_at(self, index: int) -> str | None:
        return self.keys[index]

    def value_at(self, index: int) -> Any:
        return self.values[index]

    def size(self) -> int:
        return len(self.keys)

    def is_empty(self) -> bool:
        return not self.keys
