"""LMI's session requests (djl_python/session_utils.py at the commit the package doc names):
``create_session`` answers ``X-Amzn-SageMaker-Session-Id: <id>; Expires=<UTC time>`` (lines
25-43), ``close_session`` answers ``X-Amzn-SageMaker-Closed-Session-Id: <id>`` (lines 46-61);
a failure of either is an in-band 424. ``get_session`` (lines 64-73) refuses a session header
when sessions are off and asks the manager otherwise (which raises for an unknown id)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from djl_python.async_utils import create_non_stream_output
from djl_python.outputs import Output

HEADER_SAGEMAKER_SESSION_ID = "X-Amzn-SageMaker-Session-Id"
HEADER_SAGEMAKER_CLOSED_SESSION_ID = "X-Amzn-SageMaker-Closed-Session-Id"


async def create_session(request: tuple) -> dict[str, Any]:
    manager, _ = request
    try:
        session = manager.create_session()
    except Exception as exc:
        return {"error": f"Failed to create session: {exc}", "code": 424}
    expires = datetime.fromtimestamp(session.expiration_ts, tz=UTC)
    return {"data": {"result": f"Session {session.session_id} created"},
            "properties": {HEADER_SAGEMAKER_SESSION_ID:
                           f"{session.session_id}; Expires={expires:%Y-%m-%dT%H:%M:%SZ}"}}


async def close_session(request: tuple) -> dict[str, Any]:
    manager, inputs = request
    session_id = inputs.get_property(HEADER_SAGEMAKER_SESSION_ID)
    try:
        manager.close_session(session_id)
    except Exception as exc:
        return {"error": f"Failed to close session: {exc}", "code": 424}
    return {"data": {"result": f"Session {session_id} closed"},
            "properties": {HEADER_SAGEMAKER_CLOSED_SESSION_ID: f"{session_id}"}}


def get_session(manager: Any, request: Any) -> Any:
    session_id = request.get_property(HEADER_SAGEMAKER_SESSION_ID)
    if manager is None:
        if session_id is not None:
            raise RuntimeError("invalid payload. stateful sessions not enabled, "
                               f"{HEADER_SAGEMAKER_SESSION_ID} header not supported")
        return None
    return manager.get_session(session_id)


def session_non_stream_output_formatter(response: dict, **_: Any) -> Output:
    if "error" in response:
        return create_non_stream_output("", error=response["error"], code=response["code"])
    return create_non_stream_output(response["data"], properties=response.get("properties"))
