"""Pre-warm an endpoint's cache with documents: each one is sent once as a prefill-only request
(one new token), so its KV is computed once and stored in every tier; later questions over it
load that prefix instead of recomputing it.

- Documents (``read_documents``): a folder of ``*.txt`` / ``*.md`` files (sorted; a file is a
  document), one text file, or a ``.jsonl`` file (an object per line, the text in ``text`` or
  another field, an optional ``id``). A document that cannot be read is a failed result, not a
  crash.
- The prefix must match what the application sends: each text is wrapped in a template whose
  ``{document}`` is replaced by it (literally; other braces stay), e.g. the words before and
  after the document in the application's prompt. Sent as LMI's schema (``inputs``) or, with
  ``chat``, as the system message of an OpenAI chat request (the endpoint's chat template then
  renders it as it renders the application's).
- Resumable: each document is first asked with a lookup (custom attribute
  ``lmcache-ext-lookup=true``, answered by the built-in server without generating); one whose
  whole chunks are all cached is skipped (lmcache-ext's LMI handler answers lookups too: ``adapters/
  lmi/lookup.py``). An endpoint that does not answer lookups (LMI without our connector ignores
  the attribute) generates one token instead: that request was the warm request, so the
  document counts as warmed, and nothing can be skipped.
- Concurrency: a thread pool; errors are per document (``DocumentResult.error``).

A warm request lands on whichever instance serves it: behind an endpoint of several instances,
the others see the document only through a shared tier (Redis/Valkey).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from lmcache_ext.client.transport import Reply
from lmcache_ext.wire import LOOKUP_REQUEST

DOCUMENT_PLACEHOLDER = "{document}"
DEFAULT_TEMPLATE = DOCUMENT_PLACEHOLDER
DEFAULT_CONCURRENCY = 4
DOCUMENT_SUFFIXES = (".txt", ".md")
WARMED, SKIPPED, FAILED = "warmed", "skipped", "failed"


class Transport(Protocol):
    def invoke(self, body: bytes, session: str | None = None,
               custom_attributes: str | None = None) -> Reply: ...


@dataclass(frozen=True)
class Document:
    name: str  # the file's name, the JSONL line's id, or "FILE:LINE"
    text: str | None  # None when it could not be read (``error`` says why)
    error: str | None = None


@dataclass(frozen=True)
class DocumentResult:
    name: str
    outcome: str  # WARMED, SKIPPED (its whole chunks were already cached) or FAILED
    prompt_tokens: int | None = None  # the wrapped document's tokens, where the endpoint says
    cached_tokens: int | None = None  # of those, cached before this run warmed it (where said)
    seconds: float = 0.0
    error: str | None = None
    note: str | None = None  # e.g. shorter than a chunk: nothing of it can be kept


@dataclass
class WarmSummary:
    results: list[DocumentResult] = field(default_factory=list)
    seconds: float = 0.0
    lookups_answered: bool | None = None  # None: no request got an answer

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def ok(self) -> bool:
        return self.count(FAILED) == 0

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens or 0 for r in self.results)

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens or 0 for r in self.results)

    def lines(self) -> list[str]:
        """The summary a person reads."""
        lines = [f"documents {len(self.results)}: {self.count(WARMED)} warmed, "
                 f"{self.count(SKIPPED)} skipped (already cached), {self.count(FAILED)} failed",
                 f"prompt tokens {self.prompt_tokens}, already cached {self.cached_tokens}, "
                 f"time {self.seconds:.1f} s"]
        if self.lookups_answered is False:
            lines.append("the endpoint does not answer lookups: every document was sent "
                         "(nothing could be skipped; token counts only where its replies "
                         "carry them)")
        return lines


# ------------------------------------------------------------------ documents


def read_documents(path: str | Path, text_field: str = "text") -> list[Document]:
    """The documents under ``path``: a folder (its ``*.txt`` and ``*.md`` files, sorted by
    name), a ``.jsonl`` file, or one text file. Raises ValueError for a path that is none of
    those; a document that cannot be read is returned with its ``error``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and
                       p.suffix.lower() in DOCUMENT_SUFFIXES)
        return [_read_file(p, p.name) for p in files]
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return list(_read_jsonl(path, text_field))
    if path.is_file():
        return [_read_file(path, path.name)]
    raise ValueError(f"{path}: not a folder, a .jsonl file or a text file")


def _read_file(path: Path, name: str) -> Document:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return Document(name, None, f"unreadable: {exc}")
    return Document(name, text) if text.strip() else Document(name, None, "empty")


def _read_jsonl(path: Path, text_field: str) -> Iterable[Document]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{number}"
            try:
                item = json.loads(line)
            except ValueError as exc:
                yield Document(where, None, f"not JSON ({exc})")
                continue
            if not isinstance(item, dict):
                yield Document(where, None, f"expected a JSON object, got {type(item).__name__}")
                continue
            name = str(item["id"]) if item.get("id") not in (None, "") else where
            text = item.get(text_field)
            if not isinstance(text, str) or not text.strip():
                yield Document(name, None, f"no text in field {text_field!r}")
                continue
            yield Document(name, text)


# ------------------------------------------------------------------ requests


def check_template(template: str) -> str:
    """``template`` if it holds ``{document}``, else ValueError."""
    if DOCUMENT_PLACEHOLDER not in template:
        raise ValueError(f"the template has no {DOCUMENT_PLACEHOLDER} (where each document's "
                         f"text goes): {template[:80]!r}")
    return template


def wrap(template: str, text: str) -> str:
    """The template with ``{document}`` replaced by ``text`` (literally; other braces stay)."""
    return template.replace(DOCUMENT_PLACEHOLDER, text)


def warm_body(text: str, chat: bool = False) -> bytes:
    """A prefill-only request: one new token, greedy. LMI's schema, or with ``chat`` an OpenAI
    chat request with ``text`` as its system message."""
    if chat:
        body: dict[str, Any] = {"messages": [{"role": "system", "content": text}],
                                "max_tokens": 1, "temperature": 0}
    else:
        body = {"inputs": text, "parameters": {"max_new_tokens": 1, "do_sample": False}}
    return json.dumps(body).encode()


@dataclass(frozen=True)
class Answer:
    lookup: bool  # a lookup's answer (else a generation's: the endpoint ignored the lookup)
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    chunk_tokens: int | None = None


def parse_answer(body: bytes) -> Answer:
    """A lookup's answer, or the counts a generation's reply carries (LMI's ``details``, OpenAI's
    ``usage``; absent where the endpoint does not report them)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return Answer(False)
    if isinstance(payload, list) and payload:  # LMI answers a batch of one as a list
        payload = payload[0]
    if not isinstance(payload, dict):
        return Answer(False)
    if isinstance(found := payload.get("lookup"), dict):
        return Answer(True, _int(found.get("prompt_tokens")), _int(found.get("cached_tokens")),
                      _int(found.get("chunk_tokens")))
    details = payload.get("details") if isinstance(payload.get("details"), dict) else {}
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    usage_details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens", usage_details.get("cached_tokens")
                         if isinstance(usage_details, dict) else None)
    return Answer(False, _int(details.get("prompt_tokens", usage.get("prompt_tokens"))),
                  _int(cached))


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ------------------------------------------------------------------ warming


def warm_one(document: Document, transport: Transport, template: str,
             chat: bool = False) -> tuple[DocumentResult, bool | None]:
    """Look ``document`` up, and warm it unless its whole chunks are all cached. Returns its
    result and whether the endpoint answered the lookup (None when nothing was answered).
    Never raises: an error is the result's."""
    began = time.perf_counter()
    if document.text is None:
        return DocumentResult(document.name, FAILED, error=document.error), None
    body = warm_body(wrap(template, document.text), chat)
    answered = None
    try:
        first = parse_answer(transport.invoke(body, custom_attributes=LOOKUP_REQUEST).body)
        answered = first.lookup
        if not first.lookup:  # the endpoint generated: that was the warm request
            return _done(document, WARMED, first, began), answered
        chunk = first.chunk_tokens or 0
        whole = (first.prompt_tokens or 0) // chunk * chunk if chunk else 0
        cached = first.cached_tokens or 0
        if cached > 0 and cached >= whole:
            return _done(document, SKIPPED, first, began), answered
        transport.invoke(body)
    except Exception as exc:  # per document: the others go on (HTTP, ModelError, timeouts)
        return DocumentResult(document.name, FAILED, seconds=time.perf_counter() - began,
                              error=f"{type(exc).__name__}: {exc}"), answered
    note = (f"shorter than a chunk ({chunk} tokens): nothing of it is kept" if whole == 0 and
            chunk else None)
    return _done(document, WARMED, first, began, note), answered


def _done(document: Document, outcome: str, answer: Answer, began: float,
          note: str | None = None) -> DocumentResult:
    return DocumentResult(document.name, outcome, answer.prompt_tokens, answer.cached_tokens,
                          time.perf_counter() - began, note=note)


def warm(documents: Sequence[Document], transport: Transport,
         template: str = DEFAULT_TEMPLATE, concurrency: int = DEFAULT_CONCURRENCY,
         chat: bool = False,
         on_result: Callable[[DocumentResult, WarmSummary], None] | None = None) -> WarmSummary:
    """Warm ``documents`` through ``transport`` (``HttpTransport`` or ``SageMakerTransport``),
    ``concurrency`` at a time; ``on_result`` is called (on the caller's thread) as each one
    finishes. Results come back in the documents' order. Raises ValueError for a template
    without ``{document}`` or a concurrency below 1; nothing else. Interrupted (Ctrl-C), it
    sends no further document: those in flight finish, the rest wait for a rerun."""
    check_template(template)
    if concurrency < 1:
        raise ValueError(f"concurrency: {concurrency} must be >= 1")
    summary = WarmSummary()
    began = time.perf_counter()
    results: dict[int, DocumentResult] = {}
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="warm")
    try:
        futures = {pool.submit(warm_one, doc, transport, template, chat): index
                   for index, doc in enumerate(documents)}
        for future in as_completed(futures):
            result, answered = future.result()
            results[futures[future]] = result
            if answered is not None:
                summary.lookups_answered = bool(summary.lookups_answered) or answered
            summary.results.append(result)
            summary.seconds = time.perf_counter() - began
            if on_result is not None:
                on_result(result, summary)
    except BaseException:  # Ctrl-C: documents not yet started are not sent (a rerun sends them)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    summary.results = [results[i] for i in range(len(documents))]
    summary.seconds = time.perf_counter() - began
    return summary


class Progress:
    """A one-line progress report on ``stream`` (rewritten in place on a terminal; elsewhere
    only the lines below), and a line for each failed document or note, as they come."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._told_no_lookup = False
        self.last: WarmSummary | None = None  # the summary so far (what an interrupt reports)

    def __call__(self, result: DocumentResult, summary: WarmSummary) -> None:
        self.last = summary
        if result.outcome == FAILED:
            self._line(f"warm: FAILED {result.name}: {result.error}")
        elif result.note:
            self._line(f"warm: {result.name}: {result.note}")
        if summary.lookups_answered is False and not self._told_no_lookup:
            self._told_no_lookup = True
            self._line("warm: the endpoint does not answer lookups; every document is sent "
                       "(none can be skipped)")
        if self.live:
            done = len(summary.results)
            self.stream.write(f"\rwarm: {done}/{self.total} documents ({summary.count(WARMED)} "
                              f"warmed, {summary.count(SKIPPED)} skipped, "
                              f"{summary.count(FAILED)} failed) {summary.seconds:.1f} s")
            self.stream.flush()

    def end(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(("\r\033[K" if self.live else "") + text + "\n")
        self.stream.flush()
