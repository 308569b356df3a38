"""Request parsing for the SageMaker/LMI contract and the OpenAI-style endpoints.

``/invocations`` takes, told apart by payload shape as LMI does: the LMI schema
``{"inputs": str, "parameters": {...}, "stream": bool}``, OpenAI completions (``prompt``) and
OpenAI chat (``messages``). Every problem is a ``RequestError`` naming the field, never a crash.
Response bodies in the request's style (``format_full``, ``format_event``) are shaped here too.
A lookup-only request (``/lookup``, or ``/invocations`` with the ``lmcache-ext-lookup`` custom
attribute) takes the same payloads and is answered by ``wire.format_lookup``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from lmcache_ext.serving.generator import GenerationStats, SamplingParams, TokenEvent
from lmcache_ext.wire import MAX_BODY_BYTES

# Chat roles we serve: plain text turns. Tool turns (tool_call_id, tool_calls) are not parsed and
# the chat templates we ship render no "developer" or "tool" role, so those are refused.
CHAT_ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A bad request: ``status`` is the HTTP status, the message names the field."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class GenerateRequest:
    style: str  # "lmi", "completions" or "chat": decides the response format
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False


def _require(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    ok = isinstance(value, kind) and not (kind in (int, float, (int, float)) and
                                          isinstance(value, bool))
    if not ok:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        wanted = " or ".join(k.__name__ for k in kinds)
        raise RequestError(f"{name}: expected {wanted}, got {type(value).__name__}")
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    _require(value, (int, float), name)
    if not low <= value <= high:
        raise RequestError(f"{name}: {value} is out of range [{low}, {high}]")
    return float(value)


def _stop(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    _require(value, list, name)
    for item in value:
        _require(item, str, f"{name}[]")
    return tuple(s for s in value if s)


# name in the request -> (our field, parser)
_LMI_PARAMS = {
    "max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
    "top_k": "top_k", "do_sample": "do_sample", "stop": "stop", "stop_sequences": "stop",
    "seed": "seed", "details": None, "return_full_text": None,
}
_OPENAI_PARAMS = {
    "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
    "model": None, "n": None, "stream": None, "user": None,
}


def _sampling(values: dict[str, Any], names: dict[str, str | None], where: str,
              sample_by_temperature: bool) -> SamplingParams:
    fields: dict[str, Any] = {}
    for name, value in values.items():
        if name not in names:
            allowed = ", ".join(sorted(names))
            raise RequestError(f"{where}{name}: unknown parameter (allowed: {allowed})")
        target = names[name]
        if target is None or value is None:
            continue
        label = f"{where}{name}"
        if target == "max_new_tokens":
            fields[target] = int(_number(_require(value, int, label), label, 1, 1 << 20))
        elif target in ("temperature", "top_p"):
            fields[target] = _number(value, label, 0.0, 100.0 if target == "temperature" else 1.0)
        elif target == "top_k":
            fields[target] = int(_number(_require(value, int, label), label, 0, 1 << 20))
        elif target == "do_sample":
            fields[target] = _require(value, bool, label)
        elif target == "seed":
            fields[target] = _require(value, int, label)
        elif target == "stop":
            fields[target] = _stop(value, label)
    if sample_by_temperature:  # OpenAI: temperature 0 means greedy, anything else samples
        fields["do_sample"] = fields.get("temperature", 1.0) > 0
    if values.get("n", 1) != 1:
        raise RequestError(f"{where}n: only n=1 is supported")
    return SamplingParams(**fields)


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    _require(value, list, "messages")
    if not value:
        raise RequestError("messages: must not be empty")
    out = []
    for index, message in enumerate(value):
        _require(message, dict, f"messages[{index}]")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise RequestError(f"messages[{index}]: needs string 'role' and 'content'")
        if role not in CHAT_ROLES:
            raise RequestError(f"messages[{index}].role: {role!r} is not allowed (allowed: "
                               f"{', '.join(CHAT_ROLES)})")
        out.append({"role": role, "content": content})
    return tuple(out)


def _text(value: Any, name: str) -> str:
    if isinstance(value, list) and len(value) == 1:  # a batch of one
        value = value[0]
    _require(value, str, name)
    if not value:
        raise RequestError(f"{name}: must not be empty")
    return value


def decode_body(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"body of {len(body)} bytes is over {MAX_BODY_BYTES}", status=413)
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"body: not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise RequestError("body: JSON nested too deeply") from exc
    _require(payload, dict, "body")
    _check_unicode(payload)
    return payload


def _check_unicode(payload: dict[str, Any]) -> None:
    """JSON can carry lone surrogates ("\\ud800") that are not text: no tokenizer encodes them.
    Raises a RequestError naming a field that holds one (field names are checked too)."""
    pending: list[tuple[str, Any]] = [("", payload)]
    while pending:  # a loop, not recursion: nesting is as deep as the body allows
        name, value = pending.pop()
        if isinstance(value, str):
            _encodable(value, name)
        elif isinstance(value, dict):
            for key, item in value.items():
                _encodable(key, f"{name or 'body'} (a field name)")
                pending.append((f"{name}.{key}" if name else key, item))
        elif isinstance(value, list):
            pending += [(f"{name}[{index}]", item) for index, item in enumerate(value)]


def _encodable(text: str, name: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{name}: not valid Unicode (a lone surrogate at character "
                           f"{exc.start})") from None


def parse_lmi(payload: dict[str, Any]) -> GenerateRequest:
    unknown = set(payload) - {"inputs", "parameters", "stream"}
    if unknown:
        raise RequestError(f"{sorted(unknown)[0]}: unknown field (allowed: inputs, parameters, "
                           f"stream)")
    params = _require(payload.get("parameters") or {}, dict, "parameters")
    return GenerateRequest("lmi", prompt=_text(payload.get("inputs"), "inputs"),
                           params=_sampling(params, _LMI_PARAMS, "parameters.", False),
                           stream=_require(payload.get("stream", False), bool, "stream"))


def parse_completions(payload: dict[str, Any]) -> GenerateRequest:
    rest = {k: v for k, v in payload.items() if k != "prompt"}
    return GenerateRequest("completions", prompt=_text(payload.get("prompt"), "prompt"),
                           params=_sampling(rest, _OPENAI_PARAMS, "", True),
                           stream=_require(payload.get("stream", False), bool, "stream"))


def parse_chat(payload: dict[str, Any]) -> GenerateRequest:
    rest = {k: v for k, v in payload.items() if k != "messages"}
    return GenerateRequest("chat", messages=_messages(payload.get("messages")),
                           params=_sampling(rest, _OPENAI_PARAMS, "", True),
                           stream=_require(payload.get("stream", False), bool, "stream"))


def parse_invocation(payload: dict[str, Any]) -> GenerateRequest:
    """Tell the schema apart by payload shape, as LMI does."""
    if "messages" in payload:
        return parse_chat(payload)
    if "prompt" in payload:
        return parse_completions(payload)
    if "inputs" in payload:
        return parse_lmi(payload)
    raise RequestError("body: needs 'inputs' (LMI), 'prompt' (completions) or 'messages' (chat)")


def _usage(stats: GenerationStats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.loaded_tokens}}


def _finish(reason: str | None) -> str | None:
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason or "", None)


def format_full(request: GenerateRequest, stats: GenerationStats, model: str) -> dict[str, Any]:
    """The non-streaming response body."""
    if request.style == "lmi":
        return {"generated_text": stats.text,
                "details": {"finish_reason": _finish(stats.finish_reason),
                            "generated_tokens": stats.generated_tokens,
                            "prompt_tokens": stats.prompt_tokens,
                            "cached_tokens": stats.loaded_tokens}}
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(stats.finish_reason)}
    if request.style == "chat":
        choice["message"] = {"role": "assistant", "content": stats.text}
        kind = "chat.completion"
    else:
        choice["text"] = stats.text
        kind = "text_completion"
    return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": kind, "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _usage(stats)}


def format_event(request: GenerateRequest, event: TokenEvent, stats: GenerationStats,
                 model: str) -> dict[str, Any]:
    """One streamed object."""
    done = event.finish_reason is not None
    if request.style == "lmi":
        return {"token": {"id": event.token_id, "text": event.text},
                "generated_text": stats.text if done else None,
                **({"details": format_full(request, stats, model)["details"]} if done else {})}
    finish = _finish(event.finish_reason)
    if request.style == "chat":
        choice = {"index": 0, "delta": {"content": event.text}, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": event.text, "finish_reason": finish}
        kind = "text_completion"
    body = {"object": kind, "created": int(time.time()), "model": model, "choices": [choice]}
    if done:
        body["usage"] = _usage(stats)
    return body
