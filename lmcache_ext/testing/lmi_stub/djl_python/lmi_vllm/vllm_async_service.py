"""LMI's vLLM service as a handler sees it (djl_python/lmi_vllm/vllm_async_service.py at the
commit the package doc names).

- ``handle`` (lines 437-460): the model directory's ``model.py`` (``CustomHandlerService``) is
  tried first, and answers unless it returns None; then the service initialises once and serves
  the request (None for the empty load request).
- ``VLLMHandler.initialize`` (lines 88-205): the engine, then a ``SessionManager`` only when
  ``enable_stateful_sessions`` is exactly ``"true"`` (no attribute otherwise, as in LMI).
- ``preprocess_request`` (lines 217-328): the session header is checked first
  (``session_utils.get_session``: an unknown id raises); payloads by ``prompt``, ``inputs``
  (LMI's schema, its ``parameters`` merged in), ``requestType`` (NEW_SESSION / CLOSE).
- ``inference`` (lines 337-380): a request that fails to parse is an in-band 424
  (``create_non_stream_output(..., code=424)``); answers are ``create_non_stream_output``.
Requests become vLLM ``CompletionRequest``s as in LMI, so their ``kv_transfer_params`` reach the
engine through ``SamplingParams.extra_args``. The answer's body is the stand-in's own (token ids
and vLLM's cached-token count, what the tests read), not LMI's formatters.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from djl_python.async_utils import create_non_stream_output
from djl_python.custom_handler_service import CustomHandlerService
from djl_python.inputs import Input
from djl_python.outputs import Output
from djl_python.session_manager import SessionManager
from djl_python.session_utils import (
    close_session,
    create_session,
    get_session,
    session_non_stream_output_formatter,
)

DEFAULT_MAX_TOKENS = 16
SESSION_REQUESTS = {"NEW_SESSION": create_session, "CLOSE": close_session}


def _engine_args(properties: dict[str, str]):
    from vllm import AsyncEngineArgs

    kwargs: dict[str, Any] = dict(
        model=properties["model_id"], dtype=properties.get("dtype", "auto"), seed=0,
        enforce_eager=True, max_model_len=int(properties.get("max_model_len", "2048")),
        tensor_parallel_size=int(properties.get("tensor_parallel_degree", "1")),
        enable_prefix_caching=properties.get("enable_prefix_caching", "true") == "true")
    if "kv_transfer_config" in properties:
        kwargs["kv_transfer_config"] = json.loads(properties["kv_transfer_config"])
    return AsyncEngineArgs(**kwargs)


class VLLMHandler:
    def __init__(self) -> None:
        self.vllm_engine = None
        self.initialized = False

    async def initialize(self, properties: dict[str, str]) -> None:
        from vllm import AsyncLLMEngine

        self.vllm_engine = AsyncLLMEngine.from_engine_args(_engine_args(properties))
        if properties.get("enable_stateful_sessions", "true") == "true":
            self.session_manager = SessionManager(properties)
        self.initialized = True

    def preprocess_request(self, inputs: Input) -> tuple[Any, Any]:
        """(the call that serves the request, its argument); raises for a bad request."""
        raw = inputs.get_batches()[0]
        get_session(self.session_manager, raw)  # LMI: an AttributeError with sessions off
        payload = raw.get_as_json()
        if "prompt" in payload or "inputs" in payload:
            return self._generate, _completion_request(payload)
        if "requestType" in payload:
            kind = payload["requestType"]
            if kind not in SESSION_REQUESTS:
                raise RuntimeError(f"invalid payload. request type must be one of "
                                   f"{SESSION_REQUESTS.keys()}")
            if self.session_manager is None:
                raise RuntimeError(f"invalid payload. stateful sessions not enabled, {kind} "
                                   "not supported")
            return _session_answer(SESSION_REQUESTS[kind]), (self.session_manager, inputs)
        raise RuntimeError("invalid payload. must contain prompt, inputs, or messages")

    async def inference(self, inputs: Input) -> Output:
        try:
            invoke, request = self.preprocess_request(inputs)
        except Exception as exc:
            logging.exception("Input parsing failed")
            return create_non_stream_output("", error=f"Input parsing failed: {exc}", code=424)
        return await invoke(request)

    async def _generate(self, request: Any) -> Output:
        from vllm.inputs import TextPrompt, TokensPrompt

        params = request.to_sampling_params(request.max_tokens or DEFAULT_MAX_TOKENS, {})
        prompt = request.prompt
        prompt = (TokensPrompt(prompt_token_ids=list(prompt)) if isinstance(prompt, list)
                  else TextPrompt(prompt=prompt))
        final = None
        async for output in self.vllm_engine.generate(prompt, params, str(uuid.uuid4())):
            final = output
        completion = final.outputs[0]
        return create_non_stream_output({
            "choices": [{"text": completion.text, "token_ids": list(completion.token_ids)}],
            "usage": {"prompt_tokens": len(final.prompt_token_ids),
                      "completion_tokens": len(completion.token_ids),
                      "prompt_tokens_details": {"cached_tokens": final.num_cached_tokens or 0}}})


def _session_answer(call: Any) -> Any:
    async def answer(request: tuple) -> Output:
        return session_non_stream_output_formatter(await call(request))
    return answer


def _completion_request(payload: dict[str, Any]):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    if "prompt" in payload:
        return CompletionRequest(**{"model": "lmi", **payload})
    parameters = dict(payload.get("parameters", {}))  # LMI's schema: fields of the request
    fields = {"prompt": payload["inputs"], "model": "lmi",
              "max_tokens": parameters.pop("max_new_tokens", 30), **parameters}
    return CompletionRequest(**fields)


custom_service = None
service = VLLMHandler()


async def handle(inputs: Input) -> Output | None:
    global custom_service
    if custom_service is None:
        custom_service = CustomHandlerService(inputs.get_properties())
    if custom_service.initialized:
        result = await custom_service.handle(inputs)
        if result is not None:
            return result
    if not service.initialized:
        await service.initialize(inputs.get_properties())
    if inputs.is_empty():
        return None
    return await service.inference(inputs)
