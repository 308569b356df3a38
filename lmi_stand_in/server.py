"""The LMI stand-in's model server: DJL Serving's place in the stand-in base image
(``container/lmi_stand_in/``), a small HTTP server over LMI's Python side.

What it does as DJL does for one model in async mode:
- reads LMI's settings as ``lmcache_ext.container.lmi_settings`` models them (serving.properties
  in the model directory, then ``OPTION_*`` env vars; the file wins), the model being
  ``option.model_id`` or the model directory;
- loads the handler named by ``option.entryPoint`` / ``OPTION_ENTRYPOINT`` (default LMI's vLLM
  service, ``djl_python.lmi_vllm.vllm_async_service``) with ``service_loader``, and calls its
  ``handle`` once with the properties (LMI's load call); a failed load exits 1;
- ``GET /ping``: 503 while loading, then 200; ``POST /invocations``: the request through
  ``frontend``'s model of DJL's Java side (headers become properties, SageMaker's custom
  attributes split, the socket encoding both ways, async answers decoded); the ``Output``'s
  properties (session headers included) are the answer's headers;
- SIGTERM (``docker stop``): stops listening, shuts the engine down (its KV connector finishes
  what it stores), exits 0.
What it is not: DJL (Java), batching across workers, streaming, more than one model.
In the image it runs as ``python3 -m lmi_stand_in.server`` (the Dockerfile copies this package,
with ``lmcache_ext/container/lmi_settings.py`` as its ``settings``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any

from lmi_stand_in.frontend import HANDLER, answer_of, encode_request, http_request, reader
from lmi_stand_in.settings import read_settings

log = logging.getLogger("lmi_stand_in")
DEFAULT_ENTRY_POINT = "djl_python.lmi_vllm.vllm_async_service"
PORT = int(os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080"))
MAX_BODY = 64 << 20
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           413: "Payload Too Large", 424: "Failed Dependency", 500: "Internal Server Error",
           503: "Service Unavailable"}


class Server:
    """One model behind /ping and /invocations."""

    def __init__(self) -> None:
        self.model: Any = None
        self.properties: dict[str, str] = {}

    async def load(self) -> None:
        from djl_python.inputs import Input
        from djl_python.service_loader import load_model_service

        settings = read_settings(os.environ)
        options = {name: option.value for name, option in settings.options.items()}
        entry = options.pop("entryPoint", None) or options.pop("entrypoint", None)
        self.properties = {**options, "model_id": settings.model_id[0]}
        log.info("loading %s with %s", entry or DEFAULT_ENTRY_POINT, self.properties)
        model = load_model_service(settings.model_dir, entry or DEFAULT_ENTRY_POINT, -1)
        load = Input()
        load.read(reader(encode_request({**self.properties, HANDLER: "handle"}, [])))
        await model.invoke_handler_async("handle", load)  # DJL's load call
        self.model = model
        log.info("model loaded: serving on port %d", PORT)

    async def invoke(self, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        from djl_python.inputs import Input

        inputs = Input()
        inputs.read(reader(http_request(headers, body)))
        answer = answer_of(await self.model.invoke_handler_async(inputs.get_function_name(),
                                                                 inputs))
        return answer.code, answer.headers, answer.body

    async def route(self, method: str, path: str, headers: dict[str, str],
                    body: bytes) -> tuple[int, dict, bytes]:
        if path == "/ping" and method == "GET":
            return (200, {}, b"{}") if self.model is not None else (503, {}, b"loading")
        if path == "/invocations" and method == "POST":
            if self.model is None:
                return 503, {}, b"loading"
            try:
                return await self.invoke(headers, body)
            except Exception as exc:  # DJL answers 500 and keeps serving
                log.exception("invocation failed")
                return 500, {}, f"{type(exc).__name__}: {exc}".encode()
        return 404, {}, b"not found"

    async def connection(self, rd: asyncio.StreamReader, wr: asyncio.StreamWriter) -> None:
        """HTTP/1.1 with keep-alive: one request after another on the connection."""
        try:
            while request := await read_request(rd):
                method, path, headers, body = request
                code, extra, payload = await self.route(method, path, headers, body)
                wr.write(response(code, extra, payload))
                await wr.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # the client went away, or sent what is not HTTP: drop the connection
        finally:
            wr.close()


async def read_request(rd: asyncio.StreamReader) -> tuple[str, str, dict, bytes] | None:
    """(method, path, headers, body), or None at the end of the connection."""
    line = await rd.readline()
    if not line.strip():
        return None
    method, target, _version = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (raw := await rd.readline()) not in (b"\r\n", b"\n", b""):
        key, _, value = raw.decode("latin-1").partition(":")
        headers[key.strip()] = value.strip()
    length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
    if length < 0 or length > MAX_BODY:
        raise ValueError(f"a body of {length} bytes")
    return method, target.split("?", 1)[0], headers, await rd.readexactly(length)


def response(code: int, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {code} {REASONS.get(code, 'Error')}"]
    sent = {"Content-Type": "application/json", **headers, "Content-Length": str(len(body))}
    lines += [f"{key}: {value}" for key, value in sent.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def serve() -> int:
    server = Server()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listener = await asyncio.start_server(server.connection, "0.0.0.0", PORT)
    loading = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        log.error("the model failed to load", exc_info=loading.exception())
        return 1
    await stopping
    log.info("SIGTERM: stopping")
    listener.close()
    service = sys.modules.get("djl_python.lmi_vllm.vllm_async_service")
    engine = getattr(getattr(service, "service", None), "vllm_engine", None)
    if engine is not None:
        engine.shutdown()
    log.info("stopped")
    return 0


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code = asyncio.run(serve())
    sys.stderr.flush()
    os._exit(code)  # engine threads and children are done or gone: do not wait on them


if __name__ == "__main__":
    main()
