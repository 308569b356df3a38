"""What the LMI handler's tests share."""

from __future__ import annotations

from typing import Any


class Recorder:
    """LMI's ``handle`` as far as the handler's tests need it: records the body it was given."""

    def __init__(self) -> None:
        self.bodies: list[dict | None] = []

    async def __call__(self, inputs: Any) -> str:
        self.bodies.append(None if inputs.is_empty() else inputs.get_as_json())
        return "answered"
