"""The djl_python stand-in and the model of DJL's Java side behave as LMI lmi27's real code
(djl-serving 7e13b081383bd46293d4b49ab214d4757b1effd5) in each point that once hid a defect:
the async binary answers, the custom-attribute split, in-band error codes, the session manager's
answers for unknown and expired sessions, the closed-session header, the CloudWatch client that
needs a region, the ``model.py`` custom handler tried first, ``Input()`` without arguments. And
the handler keeps LMI serving (and the model loading) where those points bite."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from lmcache_ext.adapters.lmi.facts import FALLBACK_REGION
from lmcache_ext.adapters.lmi.handler import SessionHandler
from lmi_stand_in.frontend import (
    WorkerRestart,
    answer_of,
    encode_request,
    request_properties,
)
from lmi_stand_in.process import use_stand_in
from tests.adapters.lmi.helpers import djl_input, djl_load, djl_request

use_stand_in()
from djl_python.inputs import Input  # noqa: E402  (the stand-in, found through use_stand_in)
from djl_python.outputs import Output  # noqa: E402
from djl_python.session_manager import SessionManager  # noqa: E402

SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
CLOSED_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"


@pytest.fixture
def no_region(monkeypatch, tmp_path):
    """An environment where boto3 finds no AWS region (and never asks the instance metadata
    service)."""
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def manager(monkeypatch, tmp_path) -> SessionManager:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    return SessionManager({"sessions_path": str(tmp_path / "sessions")})


def service_with(manager: SessionManager):
    """LMI's vLLM service as far as requests that reach no engine go."""
    from djl_python.lmi_vllm import vllm_async_service

    service = vllm_async_service.VLLMHandler()
    service.session_manager = manager
    service.initialized = True
    return service


def test_input_takes_no_arguments_and_reads_djls_socket_format():
    with pytest.raises(TypeError):
        Input({"a": "b"}, b"{}")  # noqa  (what lmi_process once built)
    request = djl_input(encode_request({"Content-Type": "application/json", "handler": "handle"},
                                       [("data", b'{"prompt": [1]}')]))
    assert request.get_function_name() == "handle"
    assert request.get_property("content-type") == "application/json"
    assert request.get_as_json() == {"prompt": [1]}
    with pytest.raises(KeyError):
        request.get_as_bytes("missing")


def test_async_answers_are_binary_encoded_and_raw_json_restarts_the_worker():
    from djl_python.async_utils import create_non_stream_output

    output = create_non_stream_output({"lookup": {"prompt_tokens": 3}})
    assert output.properties["Content-Type"] == "application/json"
    assert bytes(output.content.value_at(0))[:2] == b"\x00\x02"  # {"data", "last"}
    answer = answer_of(output)
    assert (answer.code, json.loads(answer.body)) == (200, {"lookup": {"prompt_tokens": 3}})
    raw = Output().add_property("Content-Type", "application/json").add_as_json({"lookup": 1})
    with pytest.raises(WorkerRestart):  # what lmi_lookup answered before: Java cannot decode it
        answer_of(raw)


def test_the_custom_attributes_header_is_split_into_properties_and_not_passed_on():
    properties = request_properties({
        "X-Amzn-SageMaker-Custom-Attributes": "lmcache-ext-lookup; a = b ;c=d=e;x=",
        "Content-Type": "application/json"})
    assert properties == {"a": "b", "c": "d=e", "x": "", "Content-Type": "application/json"}
    request = djl_request({"x-amzn-sagemaker-custom-attributes": "lmcache-ext-lookup=true"}, {})
    assert request.get_property("lmcache-ext-lookup") == "true"
    assert request.get_property("X-Amzn-SageMaker-Custom-Attributes") is None


def test_errors_are_in_band_a_424_inside_a_200_output(manager):
    service = service_with(manager)
    unknown = "5f0c3a52-8f0e-4d7e-9b1e-2f9a6c1d0e11"
    output = asyncio.run(service.inference(djl_request({SESSION_HEADER: unknown},
                                                       {"prompt": [1]})))
    assert output.code == 200  # the Output; the client sees the code inside it
    answer = answer_of(output)
    assert answer.code == 424
    assert json.loads(answer.body) == {"code": 424, "error": "Input parsing failed: session not "
                                                             f"found: {unknown}"}
    bad = answer_of(asyncio.run(service.inference(djl_request({}, {"something": "else"}))))
    assert bad.code == 424 and "must contain prompt, inputs, or messages" in bad.body.decode()


def test_get_session_raises_for_an_unknown_id_and_answers_none_for_an_expired_one(manager):
    with pytest.raises(ValueError, match="session not found"):
        manager.get_session("5f0c3a52-8f0e-4d7e-9b1e-2f9a6c1d0e11")
    assert manager.get_session("NEW_SESSION") is None and manager.get_session(None) is None
    session = manager.create_session()
    assert manager.get_session(session.session_id) is session
    session.expiration_ts = time.time() - 1
    assert manager.get_session(session.session_id) is None
    with pytest.raises(ValueError):
        manager.close_session("5f0c3a52-8f0e-4d7e-9b1e-2f9a6c1d0e11")


def test_new_session_and_close_answer_lmis_headers(manager):
    service = service_with(manager)
    created = answer_of(asyncio.run(service.inference(djl_request(
        {SESSION_HEADER: "NEW_SESSION"}, {"requestType": "NEW_SESSION"}))))
    assert created.code == 200
    session_id, expires = created.headers[SESSION_HEADER].split("; Expires=")
    assert json.loads(created.body) == {"result": f"Session {session_id} created"}
    assert expires.endswith("Z")
    closed = answer_of(asyncio.run(service.inference(djl_request(
        {SESSION_HEADER: session_id}, {"requestType": "CLOSE"}))))
    assert closed.code == 200 and closed.headers[CLOSED_HEADER] == session_id
    again = answer_of(asyncio.run(service.inference(djl_request(
        {SESSION_HEADER: session_id}, {"requestType": "CLOSE"}))))
    assert again.code == 424  # unknown now: an in-band error


def test_the_session_manager_needs_a_region_and_the_handler_gives_it_one(no_region, tmp_path,
                                                                          monkeypatch):
    import botocore.exceptions

    properties = {"sessions_path": str(tmp_path / "s")}
    with pytest.raises(botocore.exceptions.NoRegionError):
        SessionManager(properties)  # LMI alone: the model fails to load

    async def lmi_load(inputs):  # LMI's service initialising: it builds its session manager
        SessionManager(properties)
        return None
    for aws_region, expected in ((None, FALLBACK_REGION), ("eu-west-1", "eu-west-1")):
        monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
        if aws_region:
            monkeypatch.setenv("AWS_REGION", aws_region)
        handler = SessionHandler(lmi_load, object())
        assert asyncio.run(handler.handle(djl_load())) is None  # loaded
        assert os.environ["AWS_DEFAULT_REGION"] == expected


def test_lmis_handle_tries_the_model_dirs_model_py_first(tmp_path, monkeypatch):
    (tmp_path / "model.py").write_text(
        "from djl_python.async_utils import create_non_stream_output\n"
        "async def handle(inputs):\n"
        "    if inputs.is_empty() or inputs.get_as_json().get('custom'):\n"
        "        return create_non_stream_output({'by': 'model.py'})\n"
        "    return None\n")
    from djl_python.lmi_vllm import vllm_async_service

    service = vllm_async_service.VLLMHandler()
    monkeypatch.setattr(vllm_async_service, "service", service)
    monkeypatch.setattr(vllm_async_service, "custom_service", None)
    load = djl_load({"model_dir": str(tmp_path)})
    answer = answer_of(asyncio.run(vllm_async_service.handle(load)))
    assert json.loads(answer.body) == {"by": "model.py"}
    assert not service.initialized  # LMI never got to load its engine
    request = djl_request({}, {"custom": True})
    request.properties["model_dir"] = str(tmp_path)
    assert json.loads(answer_of(asyncio.run(vllm_async_service.handle(request))).body) == \
        {"by": "model.py"}
