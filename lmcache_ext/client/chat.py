"""The chat request the client sends (OpenAI chat schema on ``/invocations``, which the built-in
server and LMI both take) and the parsing of its answers: a whole ``chat.completion``, or
streamed JSON lines of ``chat.completion.chunk`` whose last one carries ``usage``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmcache_ext.client.transport import EndpointError


@dataclass(frozen=True)
class ChatParams:
    max_tokens: int = 64
    temperature: float = 0.0  # greedy: a conversation replays the same way


@dataclass(frozen=True)
class ChatAnswer:
    text: str
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens the endpoint loaded from its cache


def chat_body(messages: list[dict[str, str]], params: ChatParams, stream: bool) -> bytes:
    return json.dumps({"messages": messages, "max_tokens": params.max_tokens,
                       "temperature": params.temperature, "stream": stream}).encode()


def _usage(payload: dict[str, Any]) -> tuple[int | None, int | None]:
    usage = payload.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return usage.get("prompt_tokens"), details.get("cached_tokens")


def parse_answer(body: bytes) -> ChatAnswer:
    """A whole answer; an EndpointError naming what is missing if it is not one."""
    try:
        payload = json.loads(body)
        text = payload["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise EndpointError(f"not a chat answer ({exc!r}): {body[:200]!r}") from exc
    return ChatAnswer(text, *_usage(payload))


class StreamParser:
    """Streamed JSON lines, fed in pieces cut anywhere (event-stream parts, HTTP chunks)."""

    def __init__(self) -> None:
        self._pending = b""
        self._text: list[str] = []
        self._usage: tuple[int | None, int | None] = (None, None)

    def feed(self, data: bytes) -> list[str]:
        """The text pieces completed by ``data``; an EndpointError for an error line."""
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        return [piece for line in lines if line.strip() for piece in self._line(line)]

    def _line(self, line: bytes) -> list[str]:
        try:
            payload = json.loads(line)
        except ValueError as exc:
            raise EndpointError(f"stream: not a JSON line: {line[:200]!r}") from exc
        if "error" in payload:
            raise EndpointError(f"stream: {payload['error']}")
        if payload.get("usage"):
            self._usage = _usage(payload)
        pieces = []
        for choice in payload.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                pieces.append(content)
        self._text += pieces
        return pieces

    def answer(self) -> ChatAnswer:
        if self._pending.strip():
            self.feed(b"\n")
        return ChatAnswer("".join(self._text), *self._usage)
