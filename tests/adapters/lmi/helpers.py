"""What the LMI handler's tests share: requests as DJL's front end hands them to LMI's Python
worker (``lmi_stand_in.frontend``: custom attributes split, the socket encoding,
``Input().read``), and a recorder standing in for LMI's ``handle``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmi_stand_in.frontend import HANDLER, encode_request, http_request, reader
from lmi_stand_in.process import use_stand_in

use_stand_in()
from djl_python.inputs import Input  # noqa: E402  (the stand-in, found through use_stand_in)


@pytest.fixture
def aws_region(monkeypatch):
    """A region for boto3 (LMI's session manager builds a CloudWatch client), so that the
    handler's load call leaves the process's env alone."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")


def djl_input(data: bytes) -> Input:
    inputs = Input()
    inputs.read(reader(data))
    return inputs


def djl_request(headers: dict[str, str], body: Any = None, raw: bytes | None = None) -> Input:
    """A client's request (``body`` as JSON, or ``raw`` bytes) as LMI's worker receives it."""
    data = raw if raw is not None else json.dumps(body).encode()
    return djl_input(http_request(headers, data))


def djl_load(properties: dict[str, str] | None = None) -> Input:
    """DJL's load call: the model's properties, no content."""
    return djl_input(encode_request({**(properties or {}), HANDLER: "handle"}, []))


class Recorder:
    """LMI's ``handle`` as far as the handler's tests need it: records the body it was given."""

    def __init__(self) -> None:
        self.bodies: list[dict | None] = []

    async def __call__(self, inputs: Any) -> str:
        self.bodies.append(None if inputs.is_empty() else inputs.get_as_json())
        return "answered"
