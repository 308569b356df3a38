"""Conversations over SageMaker stateful sessions: one conversation id -> one session.

A conversation keeps its messages; each turn sends them all plus the new user message (the
growing prompt whose KV the session's instance holds). Its session is created on first use; when
the endpoint says the session expired or is unknown, the turn creates a new one and sends again,
so the caller sees no error (``Turn.recreated`` says it happened). ``close`` ends the session and
forgets the conversation.

Thread-safe: any thread may use any conversation. Turns of one conversation run one at a time
(its lock, held for the whole turn, streamed ones included); turns of different conversations run
in parallel. The endpoint decides whether a session is honoured; the client never guesses from
the ``Expires`` stamp (a server may extend a session that is in use).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from lmcache_ext.client.chat import ChatAnswer, ChatParams, StreamParser, chat_body, parse_answer
from lmcache_ext.client.transport import EndpointError, Reply, SessionGone
from lmcache_ext.sessions.protocol import CLOSE, NEW_SESSION, REQUEST_TYPE, parse_new_session


class Transport(Protocol):
    def invoke(self, body: bytes, session: str | None = None) -> Reply: ...

    def invoke_stream(self, body: bytes, session: str | None = None) -> Iterator[bytes]: ...


@dataclass(frozen=True)
class Turn:
    """One answered turn."""

    conversation_id: str
    text: str
    session_id: str | None
    prompt_tokens: int | None
    cached_tokens: int | None  # prompt tokens the endpoint loaded from its cache
    ttft_s: float  # request sent -> first streamed bytes (whole answer when not streamed)
    total_s: float
    recreated: bool  # this turn replaced a session the endpoint no longer had


@dataclass
class _Conversation:
    messages: list[dict[str, str]]
    lock: threading.Lock = field(default_factory=threading.Lock)
    session_id: str | None = None
    expires_at: float | None = None  # as the create answer said (informational)
    sessions_created: int = 0


class TurnStream:
    """A streamed turn: iterate for the text pieces as they arrive; ``result`` is the Turn once
    the stream ended. Nothing is sent before the first ``next``; an abandoned stream releases
    its conversation when closed or collected."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: Turn | None = None

    def __iter__(self) -> TurnStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()  # type: ignore[attr-defined]

    def __enter__(self) -> TurnStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SessionClient:
    """Conversations on one endpoint through ``transport`` (``HttpTransport`` or
    ``SageMakerTransport``). ``system_prompt`` opens every new conversation. ``sessions=False``
    sends turns without sessions (an endpoint without them; routing comparisons): the
    conversation keeps its history all the same, and ``Turn.session_id`` is None."""

    def __init__(self, transport: Transport, system_prompt: str | None = None,
                 params: ChatParams | None = None, sessions: bool = True):
        self.transport = transport
        self.sessions = sessions
        self.system_prompt = system_prompt
        self.params = params or ChatParams()
        self._conversations: dict[str, _Conversation] = {}
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- public

    def turn(self, conversation_id: str, text: str, params: ChatParams | None = None) -> Turn:
        """Send ``text`` as the next user message; the assistant's answer joins the history."""
        conversation = self._conversation(conversation_id)
        with conversation.lock:
            messages = conversation.messages + [{"role": "user", "content": text}]
            body = chat_body(messages, params or self.params, stream=False)
            began = time.perf_counter()
            reply, recreated = self._with_session(
                conversation, lambda session: self.transport.invoke(body, session))
            answer = parse_answer(reply.body)
            elapsed = time.perf_counter() - began
            return self._finish(conversation_id, conversation, messages, answer, elapsed,
                                elapsed, recreated)

    def stream_turn(self, conversation_id: str, text: str,
                    params: ChatParams | None = None) -> TurnStream:
        """Like ``turn``, streamed: ``invoke_endpoint_with_response_stream`` with the session."""
        stream = TurnStream(iter(()))
        stream._pieces = self._stream(stream, conversation_id, text, params or self.params)
        return stream

    def close(self, conversation_id: str) -> bool:
        """End the conversation's session and forget it; False if there was none. A session the
        endpoint no longer has counts as closed."""
        with self._lock:
            conversation = self._conversations.pop(conversation_id, None)
        if conversation is None:
            return False
        with conversation.lock:
            if conversation.session_id is not None:
                try:
                    self.transport.invoke(_session_body(CLOSE), conversation.session_id)
                except SessionGone:
                    pass
                conversation.session_id = None
        return True

    def close_all(self) -> None:
        with self._lock:
            ids = list(self._conversations)
        for conversation_id in ids:
            self.close(conversation_id)

    def history(self, conversation_id: str) -> list[dict[str, str]]:
        conversation = self._conversation(conversation_id)
        with conversation.lock:
            return list(conversation.messages)

    def session_of(self, conversation_id: str) -> str | None:
        conversation = self._conversation(conversation_id)
        with conversation.lock:
            return conversation.session_id

    def sessions_created(self, conversation_id: str) -> int:
        conversation = self._conversation(conversation_id)
        with conversation.lock:
            return conversation.sessions_created

    # ---------------------------------------------------------------- inside

    def _conversation(self, conversation_id: str) -> _Conversation:
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                opening = [{"role": "system", "content": self.system_prompt}] \
                    if self.system_prompt else []
                conversation = self._conversations[conversation_id] = _Conversation(opening)
            return conversation

    def _create(self, conversation: _Conversation) -> str:
        reply = self.transport.invoke(_session_body(NEW_SESSION), NEW_SESSION)
        if not reply.new_session:
            raise EndpointError("the endpoint answered a create without a session id "
                                "(are stateful sessions enabled on it?)")
        conversation.session_id, conversation.expires_at = parse_new_session(reply.new_session)
        conversation.sessions_created += 1
        return conversation.session_id

    def _with_session(self, conversation: _Conversation, send):
        """``send(session_id)``; once more with a new session if the endpoint says the session
        is gone. Returns (send's result, whether the session was replaced)."""
        if not self.sessions:
            return send(None), False
        had_session = conversation.session_id is not None
        session = conversation.session_id or self._create(conversation)
        try:
            return send(session), False
        except SessionGone:
            conversation.session_id = None
            return send(self._create(conversation)), had_session

    def _stream(self, stream: TurnStream, conversation_id: str, text: str,
                params: ChatParams) -> Iterator[str]:
        conversation = self._conversation(conversation_id)
        with conversation.lock:
            messages = conversation.messages + [{"role": "user", "content": text}]
            body = chat_body(messages, params, stream=True)
            began = time.perf_counter()
            pieces, recreated = self._with_session(
                conversation, lambda session: self.transport.invoke_stream(body, session))
            parser, first = StreamParser(), None
            for data in pieces:
                first = first if first is not None else time.perf_counter() - began
                yield from parser.feed(data)
            answer = parser.answer()
            total = time.perf_counter() - began
            stream.result = self._finish(conversation_id, conversation, messages, answer,
                                         total if first is None else first, total, recreated)

    def _finish(self, conversation_id: str, conversation: _Conversation,
                messages: list[dict[str, str]], answer: ChatAnswer, ttft_s: float,
                total_s: float, recreated: bool) -> Turn:
        conversation.messages = messages + [{"role": "assistant", "content": answer.text}]
        return Turn(conversation_id, answer.text, conversation.session_id, answer.prompt_tokens,
                    answer.cached_tokens, ttft_s, total_s, recreated)


def _session_body(kind: str) -> bytes:
    return json.dumps({REQUEST_TYPE: kind}).encode()
