"""An endpoint as a SageMaker client sees it: the LMI schema, streaming, OpenAI chat, and a
repeated document prefix that the cache serves without changing the output.

Runs against a real endpoint when ``SAGEMAKER_ENDPOINT_NAME`` is set, else against a local one
(see conftest.py)."""

from __future__ import annotations

import json

DOCUMENT = ("The KV cache holds the keys and values of every prompt token. " * 12).strip()


def lmi(prompt: str, tokens: int = 8, stream: bool = False) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": tokens, "do_sample": False},
            "stream": stream}


def test_the_lmi_schema(endpoint):
    reply = endpoint.invoke(lmi("What is a KV cache?"))
    assert isinstance(reply["generated_text"], str)


def test_a_repeated_document_prefix_gives_the_same_answer(endpoint):
    """Scenario: RAG. The second request shares the document; greedy output must not change."""
    first = endpoint.invoke(lmi(f"{DOCUMENT}\nQuestion: what does it hold?"))
    second = endpoint.invoke(lmi(f"{DOCUMENT}\nQuestion: what does it hold?"))
    assert second["generated_text"] == first["generated_text"]
    if endpoint.reports_cached_tokens:
        assert second["details"]["cached_tokens"] >= 256  # one full chunk of the seed's config


def test_streaming_is_json_lines_ending_with_the_full_text(endpoint):
    body = endpoint.invoke_stream(lmi("Tell me about caches.", stream=True))
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    assert lines and all("token" in line for line in lines)
    assert lines[-1]["generated_text"] == "".join(line["token"]["text"] for line in lines)


def test_openai_chat_messages(endpoint):
    reply = endpoint.invoke({"messages": [{"role": "user", "content": "Hello"}],
                             "max_tokens": 4, "temperature": 0})
    assert reply["choices"][0]["message"]["role"] == "assistant"
