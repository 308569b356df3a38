"""The two ways an application calls an endpoint, behind one small face for the tests: boto3's
``sagemaker-runtime`` client and the SageMaker Python SDK v3 (``sagemaker.core.resources.Endpoint``,
which makes its own boto3 client from a session). Both raise botocore's ``ClientError`` for an
error answer (``ModelError`` with the container's status in ``OriginalStatusCode``,
``ValidationError``, ...); nothing here retries or hides one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

REPLICA_HEADER = "x-lmcache-ext-replica"  # the local endpoint's router names the instance
CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Answer:
    """One invocation's answer as the application sees it."""

    body: bytes
    content_type: str | None = None
    new_session: str | None = None  # NewSessionId: "<id>; Expires=..."
    closed_session: str | None = None
    variant: str | None = None
    replica: str | None = None  # which instance served it, where the endpoint says (local)

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def session_id(self) -> str | None:
        return self.new_session.split(";", 1)[0].strip() if self.new_session else None


def _body(payload: dict[str, Any] | bytes) -> bytes:
    return payload if isinstance(payload, bytes) else json.dumps(payload).encode()


class Boto3Client:
    """``invoke_endpoint`` and ``invoke_endpoint_with_response_stream``."""

    name = "boto3"

    def __init__(self, runtime: Any, endpoint_name: str):
        self.runtime = runtime
        self.endpoint_name = endpoint_name

    def _args(self, payload: dict[str, Any] | bytes, session_id: str | None,
              custom_attributes: str | None) -> dict[str, Any]:
        args: dict[str, Any] = {"EndpointName": self.endpoint_name, "Body": _body(payload),
                                "ContentType": CONTENT_TYPE}
        if session_id is not None:
            args["SessionId"] = session_id
        if custom_attributes is not None:
            args["CustomAttributes"] = custom_attributes
        return args

    def invoke(self, payload: dict[str, Any] | bytes, session_id: str | None = None,
               custom_attributes: str | None = None) -> Answer:
        reply = self.runtime.invoke_endpoint(**self._args(payload, session_id,
                                                          custom_attributes))
        headers = reply["ResponseMetadata"]["HTTPHeaders"]
        return Answer(reply["Body"].read(), reply.get("ContentType"), reply.get("NewSessionId"),
                      reply.get("ClosedSessionId"), reply.get("InvokedProductionVariant"),
                      headers.get(REPLICA_HEADER))

    def stream(self, payload: dict[str, Any], session_id: str | None = None) -> Answer:
        reply = self.runtime.invoke_endpoint_with_response_stream(
            **self._args(payload, session_id, None))
        parts = [event["PayloadPart"]["Bytes"] for event in reply["Body"]
                 if "PayloadPart" in event]
        headers = reply["ResponseMetadata"]["HTTPHeaders"]
        return Answer(b"".join(parts), reply.get("ContentType"),
                      variant=reply.get("InvokedProductionVariant"),
                      replica=headers.get(REPLICA_HEADER))


class SdkClient:
    """``Endpoint.invoke`` and ``Endpoint.invoke_with_response_stream`` of the SDK v3, with an
    explicit boto3 session and region (the SDK's way; endpoint URLs come from the session's
    configuration, e.g. ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``). The SDK's answers carry no
    HTTP headers, so ``replica`` stays None."""

    name = "sdk"

    def __init__(self, session: Any, region: str, endpoint_name: str):
        from sagemaker.core.resources import Endpoint

        self.session = session
        self.region = region
        self.endpoint = Endpoint(endpoint_name=endpoint_name)

    def _args(self, session_id: str | None, custom_attributes: str | None) -> dict[str, Any]:
        args: dict[str, Any] = {"content_type": CONTENT_TYPE, "session": self.session,
                                "region": self.region}
        if session_id is not None:
            args["session_id"] = session_id
        if custom_attributes is not None:
            args["custom_attributes"] = custom_attributes
        return args

    def invoke(self, payload: dict[str, Any] | bytes, session_id: str | None = None,
               custom_attributes: str | None = None) -> Answer:
        reply = self.endpoint.invoke(body=_body(payload),
                                     **self._args(session_id, custom_attributes))
        body = reply.body.read() if hasattr(reply.body, "read") else reply.body
        return Answer(body, _text(reply.content_type), _text(reply.new_session_id),
                      _text(reply.closed_session_id), _text(reply.invoked_production_variant))

    def stream(self, payload: dict[str, Any], session_id: str | None = None) -> Answer:
        reply = self.endpoint.invoke_with_response_stream(body=_body(payload),
                                                          **self._args(session_id, None))
        parts = [_part(event) for event in reply.body]
        return Answer(b"".join(p for p in parts if p), _text(reply.content_type),
                      variant=_text(reply.invoked_production_variant))


def _text(value: Any) -> str | None:
    """The SDK's optional fields are ``Unassigned()`` when absent."""
    return value if isinstance(value, str) else None


def _part(event: Any) -> bytes | None:
    """A payload part's bytes from one streamed event, as the SDK hands it over (its shape,
    or botocore's dict)."""
    if isinstance(event, dict):
        return event.get("PayloadPart", {}).get("Bytes")
    part = getattr(event, "payload_part", None)
    data = getattr(part, "bytes", None)
    return data if isinstance(data, bytes) else None
