"""The soak's users: a mix of people sending OpenAI chat bodies to the router's ``/invocations``
(vLLM serves that path too), each with a think time between requests, and what each request
came to (``Outcome``). ``benchmarks/soak.py`` runs them against one engine and holds them at
``Gate`` while it samples.

- ``SessionUser``: multi-turn conversations (the whole history resent each turn) in a session
  named in each request's ``kv_transfer_params`` (``session_params.with_session``, as the LMI
  handler sets it); a conversation ends after a few turns and its session expires;
- ``RagUser``: questions about a shared document set (a few documents asked more often);
- ``OneOffUser``: prompts never seen before;
- every kind streams some requests and not others; some streams are closed by the client after
  their first pieces (counted as aborted, not failed).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from multi_round import text_of

from lmcache_ext.adapters.session_params import with_session
from lmcache_ext.sessions.protocol import new_session_id

REQUEST_TIMEOUT_S = 120.0
QUIESCE_TIMEOUT_S = 60.0  # the most a sample waits for the requests in flight to finish


@dataclass(frozen=True)
class Mix:
    """The users and their requests."""

    session_users: int = 2
    rag_users: int = 2
    oneoff_users: int = 1
    documents: int = 6
    document_tokens: int = 500
    system_tokens: int = 120
    answer_tokens: int = 12
    turns: int = 5  # a conversation's turns, then a new conversation (a new session)
    think_s: tuple[float, float] = (1.0, 3.0)
    stream_share: float = 0.6
    abort_share: float = 0.15  # of the streamed requests: closed after 1-3 pieces


@dataclass(frozen=True)
class Outcome:
    """One request, as its user saw it."""

    kind: str
    stream: bool
    finished_s: float  # since the load began
    ok: bool = True
    aborted: bool = False  # closed by the client mid-stream (on purpose)
    error: str | None = None
    ttft_s: float | None = None  # streamed: sent -> first piece
    total_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""


class Gate:
    """Lets users in unless the sampler holds it; ``hold`` waits until nobody is inside."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self._held = False

    def enter(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._held)
            self._inside += 1

    def leave(self) -> None:
        with self._cond:
            self._inside -= 1
            self._cond.notify_all()

    def hold(self) -> bool:
        """Stop new requests; True once none is in flight (False after the timeout)."""
        with self._cond:
            self._held = True
            return self._cond.wait_for(lambda: self._inside == 0, QUIESCE_TIMEOUT_S)

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


@dataclass
class Load:
    """What the users share: the router, the clock, the gate and the outcomes."""

    host: str
    port: int
    began: float
    until: float
    gate: Gate = field(default_factory=Gate)
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def since(self, index: int) -> list[Outcome]:
        with self.lock:
            return self.outcomes[index:]


def send(load: Load, kind: str, body: dict, abort_after: int | None) -> Outcome:
    """One chat request through the router's /invocations; streamed requests read SSE lines
    (closed after ``abort_after`` pieces when set)."""
    conn = http.client.HTTPConnection(load.host, load.port, timeout=REQUEST_TIMEOUT_S)
    began = time.perf_counter()
    stream = bool(body.get("stream"))
    result: dict = {}
    try:
        conn.request("POST", "/invocations", json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            result = {"ok": False, "error": f"HTTP {response.status}: "
                                            f"{response.read()[:300]!r}"}
        elif stream:
            result = read_stream(response, began, abort_after)
        else:
            result = read_whole(response.read())
    except Exception as exc:  # any error is a failed request, the figure; the user goes on
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()
    return Outcome(kind, stream, time.monotonic() - load.began,
                   total_s=time.perf_counter() - began, **result)


def _usage(payload: dict) -> dict:
    usage = payload.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "cached_tokens": int(details.get("cached_tokens") or 0)}


def read_whole(data: bytes) -> dict:
    payload = json.loads(data)
    choices = payload.get("choices") or []
    if not choices or "usage" not in payload:
        return {"ok": False, "error": f"no answer: {data[:300]!r}"}
    return {"text": choices[0].get("message", {}).get("content") or "", **_usage(payload)}


def read_stream(response: http.client.HTTPResponse, began: float,
                abort_after: int | None) -> dict:
    pieces: list[str] = []
    out: dict = {}
    while line := response.readline():
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            if "prompt_tokens" not in out:
                return {"ok": False, "error": "stream ended without usage"}
            return {**out, "text": "".join(pieces)}
        payload = json.loads(data)
        if "error" in payload:
            return {"ok": False, "error": f"stream: {payload['error']}"}
        if payload.get("usage"):
            out.update(_usage(payload))
        for choice in payload.get("choices") or []:
            if content := (choice.get("delta") or {}).get("content"):
                out.setdefault("ttft_s", time.perf_counter() - began)
                pieces.append(content)
        if abort_after is not None and len(pieces) >= abort_after:
            return {**out, "aborted": True}  # the caller closes the connection
    return {"ok": False, "error": "stream ended without [DONE]"}


class User:
    """One user: ``body`` makes its next request; ``answered`` sees how it went."""

    kind = "user"

    def __init__(self, index: int, mix: Mix, texts: Texts):
        self.index, self.mix, self.texts = index, mix, texts
        self.rng = random.Random(f"{self.kind}-{index}")
        self.count = 0

    def body(self) -> dict:
        raise NotImplementedError

    def answered(self, outcome: Outcome) -> None:
        """The outcome of the last ``body``'s request."""

    def run(self, load: Load) -> None:
        while time.monotonic() < load.until and not load.stopping.is_set():
            self.count += 1
            body = {**self.body(), "temperature": 0.0, "model": "soak"}
            stream = self.rng.random() < self.mix.stream_share
            abort = stream and self.rng.random() < self.mix.abort_share
            body.update(stream=stream, max_tokens=48 if abort else self.mix.answer_tokens)
            if stream:
                body["stream_options"] = {"include_usage": True}
            load.gate.enter()
            try:
                outcome = send(load, self.kind, body, self.rng.randint(1, 3) if abort else None)
            finally:
                load.gate.leave()
            load.add(outcome)
            self.answered(outcome)
            load.stopping.wait(self.rng.uniform(*self.mix.think_s))


class SessionUser(User):
    """Multi-turn conversations, each in a session of its own."""

    kind = "session"

    def __init__(self, index: int, mix: Mix, texts: Texts):
        super().__init__(index, mix, texts)
        self._new_conversation()

    def _new_conversation(self) -> None:
        self.session = new_session_id()
        self.messages = [{"role": "system", "content": self.texts.system}]
        self.turn = 0
        self.asked = ""

    def body(self) -> dict:
        if self.turn >= self.mix.turns:
            self._new_conversation()
        self.turn += 1
        self.asked = self.texts.make(f"s{self.index}.{self.count}", self.rng.randint(30, 100))
        return {"messages": [*self.messages, {"role": "user", "content": self.asked}],
                "kv_transfer_params": with_session(None, self.session)}

    def answered(self, outcome: Outcome) -> None:
        if outcome.ok and not outcome.aborted:  # an aborted turn is dropped, as a client does
            self.messages += [{"role": "user", "content": self.asked},
                              {"role": "assistant", "content": outcome.text}]


class RagUser(User):
    """Questions about the shared documents; the first documents are asked about more."""

    kind = "rag"

    def body(self) -> dict:
        count = len(self.texts.documents)
        document = self.rng.choices(range(count), weights=[1 / (d + 1) for d in range(count)])[0]
        question = self.texts.make(f"q{self.index}.{self.count}", self.rng.randint(15, 40))
        return {"messages": [{"role": "system", "content": self.texts.rag_system},
                             {"role": "user", "content": f"{self.texts.documents[document]}\n\n"
                                                         f"Question: {question}"}]}


class OneOffUser(User):
    """Prompts nobody sent before (256-700 tokens)."""

    kind = "oneoff"

    def body(self) -> dict:
        text = self.texts.make(f"o{self.index}.{self.count}", self.rng.randint(256, 700))
        return {"messages": [{"role": "user", "content": text}]}


@dataclass
class Texts:
    """The prompts' text (``multi_round.text_of``: distinct words, about N tokens)."""

    tokenizer: object
    system: str = ""
    rag_system: str = ""
    documents: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, model: Path, mix: Mix) -> Texts:
        from transformers import AutoTokenizer

        texts = cls(AutoTokenizer.from_pretrained(str(model)))
        texts.system = "You are a support assistant. " + texts.make("system", mix.system_tokens)
        texts.rag_system = "Answer from the document. " + texts.make("rag", mix.system_tokens)
        texts.documents = [f"Document {d}: " + texts.make(f"doc {d}", mix.document_tokens)
                           for d in range(mix.documents)]
        return texts

    def make(self, seed: str, tokens: int) -> str:
        return text_of(self.tokenizer, seed, tokens)


def users(mix: Mix, texts: Texts) -> list[User]:
    return [*(SessionUser(i, mix, texts) for i in range(mix.session_users)),
            *(RagUser(i, mix, texts) for i in range(mix.rag_users)),
            *(OneOffUser(i, mix, texts) for i in range(mix.oneoff_users))]
