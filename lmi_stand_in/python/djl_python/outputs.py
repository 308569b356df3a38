"""LMI's ``Output`` (djl_python/outputs.py at the commit the package doc names).

- content is bytes: ``add`` encodes str as UTF-8 and anything else as JSON (lines 99-116,
  146-154); ``error`` makes a 424 with a JSON body (lines 81-87);
- ``binary_encode`` (lines 156-172): a big-endian short count, then each key and ``str(value)``
  as an int length and UTF-8 bytes (a None as length -1). In async mode every answer's content is
  such a dict (``async_utils``), and DJL's Java side decodes it (``lmi_stand_in.frontend``);
- ``send`` (lines 183-202): code, message, properties, then the content entries, on the socket.
  Streaming content (``stream_content``) is not modelled.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from djl_python.pair_list import PairList


class Output:
    def __init__(self, code: int = 200, message: str = "OK"):
        self.code = code
        self.message = message
        self.properties: dict[str, Any] = {}
        self.content = PairList()

    def set_code(self, code: int) -> Output:
        self.code = code
        return self

    def error(self, error: str, code: int = 424, message: str = "invoke handler failure") -> Output:
        self.code, self.message = code, message
        self.add_property("content-type", "application/json")
        return self.add_as_json({"code": code, "message": message, "error": error})

    def add_property(self, key: str, val: Any) -> Output:
        self.properties[key] = val
        return self

    def get_properties(self) -> dict[str, Any]:
        return self.properties

    def get_property(self, key: str) -> Any:
        return self.properties.get(key)

    def add(self, value: Any, key: str | None = None) -> Output:
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif not isinstance(value, (bytes, bytearray)):
            value = self._encode_json(value)
        self.content.add(key, bytearray(value))
        return self

    def add_as_json(self, val: Any, key: str | None = None) -> Output:
        return self.add(self._encode_json(val), key)

    @staticmethod
    def _encode_json(val: Any) -> bytearray:
        return bytearray(json.dumps(val, ensure_ascii=False, allow_nan=False, indent=2,
                                    separators=(",", ":")).encode("utf-8"))

    @staticmethod
    def binary_encode(data: dict) -> bytearray:
        msg = bytearray(struct.pack(">h", len(data)))
        for key, value in data.items():
            Output.write_utf8(msg, key)
            Output.write_utf8(msg, str(value))
        return msg

    @staticmethod
    def write_utf8(msg: bytearray, val: str | None) -> None:
        if val is None:
            msg += struct.pack(">i", -1)
        else:
            buf = val.encode("utf-8")
            msg += struct.pack(">i", len(buf)) + buf

    def send(self, cl_socket: Any) -> None:
        msg = bytearray(struct.pack(">h", self.code))
        self.write_utf8(msg, self.message)
        msg += struct.pack(">h", len(self.properties))
        for key, value in self.properties.items():
            self.write_utf8(msg, key)
            self.write_utf8(msg, str(value))
        msg += struct.pack(">h", self.content.size())
        for index in range(self.content.size()):
            self.write_utf8(msg, self.content.key_at(index))
            value = self.content.value_at(index)
            msg += struct.pack(">i", len(value)) + value
        cl_socket.sendall(bytes(msg))
