"""LMI's vLLM service as a handler sees it (see the package doc): ``service`` (its ``VLLMHandler``:
``initialized``, ``vllm_engine``, ``session_manager`` only when ``enable_stateful_sessions`` is
exactly ``"true"``) and ``handle(inputs)``. Requests become vLLM ``CompletionRequest``s as in LMI
(``prompt`` payloads as they are; LMI's ``inputs`` schema with its ``parameters`` merged in), so
their ``kv_transfer_params`` reach the engine through ``SamplingParams.extra_args``."""

from __future__ import annotations

import json
import uuid
from typing import Any

from djl_python.inputs import Input
from djl_python.outputs import Output
from djl_python.session_manager import SessionManager
from lmcache_ext.sessions.protocol import SESSION_HEADER, format_new_session

DEFAULT_MAX_TOKENS = 16


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

    async def inference(self, inputs: Input) -> Output:
        raw = inputs.get_batches()[0]
        try:
            session_id = raw.get_property(SESSION_HEADER)
            if self.session_manager is None and session_id is not None:
                raise RuntimeError("stateful sessions not enabled, header not supported")
            payload = raw.get_as_json()
            if "requestType" in payload:
                return self._session_request(payload["requestType"], session_id)
            if session_id is not None:
                self.session_manager.get_session(session_id)  # LMI: a bad id is an error
            request = _completion_request(payload)
        except Exception as exc:  # LMI: "Input parsing failed", 424
            return Output.json({"error": f"Input parsing failed: {exc}"}, 424)
        return await self._generate(request)

    def _session_request(self, kind: str, session_id: str | None) -> Output:
        if kind == "NEW_SESSION":
            session = self.session_manager.create_session()
            expires = format_new_session(session.session_id,
                                         session.created() + self.session_manager.expiration)
            return Output.json({"result": f"Session {session.session_id} created"},
                               properties={SESSION_HEADER: expires})
        if kind == "CLOSE":
            try:
                self.session_manager.close_session(session_id)
            except ValueError as exc:
                return Output.json({"error": f"Failed to close session: {exc}"}, 424)
            return Output.json({"result": f"Session {session_id} closed"})
        raise RuntimeError("invalid payload. request type must be NEW_SESSION or CLOSE")

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
        return Output.json({
            "choices": [{"text": completion.text, "token_ids": list(completion.token_ids)}],
            "usage": {"prompt_tokens": len(final.prompt_token_ids),
                      "completion_tokens": len(completion.token_ids),
                      "prompt_tokens_details": {"cached_tokens": final.num_cached_tokens or 0}}})


def _completion_request(payload: dict[str, Any]):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    if "prompt" in payload:
        return CompletionRequest(**{"model": "lmi", **payload})
    if "inputs" in payload:  # LMI's schema: its parameters become the request's fields
        parameters = dict(payload.get("parameters", {}))
        fields = {"prompt": payload["inputs"], "model": "lmi",
                  "max_tokens": parameters.pop("max_new_tokens", 30), **parameters}
        return CompletionRequest(**fields)
    raise RuntimeError("invalid payload. must contain prompt, inputs, or messages")


service = VLLMHandler()


async def handle(inputs: Input) -> Output | None:
    if not service.initialized:
        await service.initialize(inputs.get_properties())
    if inputs.is_empty():
        return None
    return await service.inference(inputs)
