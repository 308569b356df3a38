"""An endpoint as an application sees it, through boto3 and the SageMaker SDK v3: the LMI schema,
OpenAI chat, streaming, a repeated document served from the cache, errors as SageMaker reports
them, and the payload limit. Runs against a real endpoint when ``SAGEMAKER_ENDPOINT_NAME`` is
set, else against a local one (conftest.py)."""

from __future__ import annotations

import json
import statistics
import time

import pytest
from botocore.exceptions import ClientError

from sagemaker_tests.clients import SdkClient
from sagemaker_tests.conftest import BUILTIN

# About 780 tokens on the local model (a token per byte): three full chunks of the seed's 256.
DOCUMENT = ("Document 7. The KV cache holds the keys and values of every prompt token, so a "
            "request that repeats a prefix skips recomputing it. ") * 6
MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker's payload limit for real-time endpoints


def lmi(prompt: str, tokens: int = 8, stream: bool = False) -> dict:
    """LMI's schema, greedy, with ``details``: LMI answers ``details`` only when asked
    (djl-serving 7e13b08, ``lmi_vllm/request_response_utils.py`` lines 84-86 and 144-146)."""
    return {"inputs": prompt, "parameters": {"max_new_tokens": tokens, "do_sample": False,
                                             "details": True}, "stream": stream}


def chat(text: str, tokens: int = 6) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": tokens,
            "temperature": 0}


def model_error(caught: pytest.ExceptionInfo) -> tuple[int, str]:
    """A ModelError's original status and message (the container's words)."""
    error = caught.value.response["Error"]
    assert error["Code"] == "ModelError", error
    return caught.value.response["OriginalStatusCode"], caught.value.response["OriginalMessage"]


def test_the_lmi_schema(client):
    answer = client.invoke(lmi("What is a KV cache?"))
    assert isinstance(answer.json()["generated_text"], str)
    assert answer.json()["details"]["generated_tokens"] >= 1
    assert answer.variant  # SageMaker names the production variant that answered


def test_openai_chat_messages(client):
    reply = client.invoke(chat("Hello")).json()
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] >= 1


def needs_streaming(target) -> None:
    if not target.streams:
        pytest.skip("the LMI stand-in's model server does not stream (lmi_stand_in/server.py); "
                    "LMI does")


def test_streaming_is_json_lines_ending_with_the_full_text(boto3_client, target):
    needs_streaming(target)
    body = boto3_client.stream(lmi("Tell me about caches.", stream=True)).body
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    assert len(lines) >= 2 and all("token" in line for line in lines)
    assert lines[-1]["generated_text"] == "".join(line["token"]["text"] for line in lines)


def test_streamed_chat_equals_the_whole_answer(boto3_client, target):
    needs_streaming(target)
    whole = boto3_client.invoke(chat("Stream me a reply")).json()["choices"][0]["message"][
        "content"]
    body = boto3_client.stream({**chat("Stream me a reply"), "stream": True}).body
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    assert "".join(line["choices"][0]["delta"]["content"] for line in lines) == whole


def test_the_sdk_cannot_stream_yet(target):
    """The SDK's ``Endpoint.invoke_with_response_stream`` (sagemaker-core 2.27, pinned) fails
    on every endpoint: botocore parses the event stream, then the SDK's own response transform
    calls ``.get`` on botocore's ``EventStream``. Stream with boto3 (the tests above); when this
    test fails, the SDK has been fixed: move the stream tests to ``client``."""
    sdk = SdkClient(target.session, target.region, target.endpoint_name)
    with pytest.raises(AttributeError, match="'EventStream' object has no attribute 'get'"):
        sdk.stream(lmi("Tell me about caches.", stream=True))


def test_a_repeated_document_is_served_from_the_cache(target, boto3_client):
    """Scenario: RAG. The same document under three questions: after the first, each reports
    the document's full chunks as cached (on a real endpoint, which reports no cached tokens,
    the repeats are faster than the first), and greedy output matches a cold run's."""
    times, answers = [], []
    document = DOCUMENT * target.document_scale
    for question in ("what does it hold?", "what does it hold?", "what does it skip?"):
        start = time.perf_counter()
        answers.append(boto3_client.invoke(lmi(f"{document}\nQuestion: {question}")).json())
        times.append(time.perf_counter() - start)
    print(f"first {times[0]:.3f} s, repeats {times[1]:.3f} s, {times[2]:.3f} s")
    assert answers[1]["generated_text"] == answers[0]["generated_text"]
    if target.reports_cached_tokens:
        assert answers[0]["details"]["cached_tokens"] == 0
        full_chunks = len(DOCUMENT) // target.chunk_tokens * target.chunk_tokens
        assert answers[1]["details"]["cached_tokens"] >= full_chunks
        assert answers[2]["details"]["cached_tokens"] >= full_chunks
    else:
        assert statistics.median(times[1:]) < times[0]


# What LMI does not refuse while parsing (djl-serving 7e13b08): a top-level field its LMI
# schema does not read is left out of the request (request_response_utils.py lines 56-99), and
# vLLM's ChatCompletionRequest takes an empty message list and any role (checked with vLLM's
# protocol classes); what follows is the model's chat template's business, so only the
# built-in server, which refuses them, is held to an error there.
BUILTIN_ONLY = {"unknown-field", "no-messages", "bad-role"}


MALFORMED = {
    "not-json": (b"{not json", "not valid JSON"),
    "bad-type": ({"inputs": "x", "parameters": {"max_new_tokens": "many"}}, "max_new_tokens"),
    "unknown-field": ({"inputs": "x", "colour": "blue"}, "colour: unknown field"),
    "no-messages": ({"messages": []}, "messages: must not be empty"),
    "bad-role": ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    "no-prompt": ({"nothing": "here"}, "needs 'inputs'"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_payload_is_a_model_error_with_the_original_status(client, target, case):
    payload, words = MALFORMED[case]
    if target.server != BUILTIN and case in BUILTIN_ONLY:
        pytest.skip("LMI does not refuse this payload while parsing it (see BUILTIN_ONLY)")
    with pytest.raises(ClientError) as caught:
        client.invoke(payload)
    original_status, message = model_error(caught)
    assert original_status == target.refusal_status, message
    if target.server == BUILTIN:  # LMI words its errors its own way
        assert words in message


def test_a_body_over_six_mib_never_reaches_the_model(boto3_client, target):
    """Scenario: a 6 MiB + 1 byte body is refused by the endpoint itself (a ValidationError, as
    SageMaker refuses payloads over its limit), not passed to the model."""
    body = json.dumps(lmi("x" * MAX_BODY_BYTES)).encode()
    assert len(body) > MAX_BODY_BYTES
    with pytest.raises(ClientError) as caught:
        boto3_client.invoke(body)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] in (400, 413)
    assert caught.value.response["Error"]["Code"] != "ModelError"


def test_a_body_within_six_mib_reaches_the_model(boto3_client, target):
    """A body just under the limit is the model's to judge: too long for the local model's
    context, a 400 from the model naming the field, not a transport failure."""
    body = json.dumps(lmi("y" * (MAX_BODY_BYTES - 200))).encode()
    assert len(body) <= MAX_BODY_BYTES
    if target.local is None:
        pytest.skip("the built-in local endpoint's context and error words only: behind LMI "
                    "the model's own context decides what it answers")
    with pytest.raises(ClientError) as caught:
        boto3_client.invoke(body)
    status, message = model_error(caught)
    assert status == 400 and "inputs" in message and "context" in message


def test_the_seed_env_vars_give_an_endpoint_with_the_cache_on(target):
    """The local instances started from the seed's two variables (config file and
    kv_transfer_config) plus the shared tier's URL; each says the cache is on."""
    if target.local is None:
        pytest.skip("reads the built-in local endpoint's instance logs: a real endpoint's are in "
                    "CloudWatch, the image's containers' in `docker logs` (tests/image)")
    for index in range(target.local.replicas):
        log = target.local.log(index)
        assert "cache on" in log, log
        assert "remote_url" in log, log
