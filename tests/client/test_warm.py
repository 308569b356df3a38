"""``lmcache-ext warm`` against real servers: the built-in server (tiny model) directly and
behind the router through boto3, and a replica that does not answer lookups (as LMI does not).
After warming, the first real question over a document finds its prefix cached."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmcache_ext.cli import main
from lmcache_ext.client import HttpTransport, SageMakerTransport
from lmcache_ext.client.warm import (
    FAILED,
    SKIPPED,
    WARMED,
    Document,
    DocumentResult,
    Progress,
    WarmSummary,
    read_documents,
    warm,
    wrap,
)
from lmcache_ext.config import load_config
from lmcache_ext.routing.policy import make_policy
from lmcache_ext.routing.router import Backend, Router
from lmcache_ext.serving.app import build_endpoint
from lmcache_ext.testing.session_replica import CUSTOM_ATTRIBUTES, SessionReplica
from lmcache_ext.testing.slow_proxy import SlowProxy
from tests.routing.conftest import runtime

CHUNK = 32
TEMPLATE = "Answer from this document.\n\n{document}\n\nQuestion: "
CHAT_TEMPLATE = "Answer from this document.\n\n{document}"


@pytest.fixture(scope="module")
def endpoint(tiny_model):
    # Loads always (the tiny model recomputes so fast the cost model could skip a load).
    config = load_config(env={}, overrides={"chunk_size": CHUNK, "max_local_cpu_size": 0.05,
                                            "cost_aware_retrieval": False})
    served = build_endpoint(config, None, "127.0.0.1", 0, loaded=tiny_model)
    threading.Thread(target=served.server.serve_forever, daemon=True).start()
    yield served
    served.close()


def text(tag: str, repeat: int = 6) -> str:
    """A document that differs from the others from its first bytes, so no whole chunk of the
    template + document is shared (the template alone is under a chunk)."""
    return f"{tag} manual: hold the reset button for ten seconds, then release it. " * repeat


def folder(tmp_path: Path, tag: str, count: int = 3) -> Path:
    """``count`` documents as .txt and .md files, and a file warm ignores."""
    docs = tmp_path / tag
    docs.mkdir()
    for index in range(count):
        suffix = ".md" if index == count - 1 else ".txt"
        (docs / f"{tag}-{index}{suffix}").write_text(text(f"{tag}-{index}"))
    (docs / "notes.json").write_text("{}")
    return docs


def ask(url: str, prompt: str) -> tuple[dict, float]:
    """A real question (one token): the reply's details and the client's time to it (TTFT)."""
    began = time.perf_counter()
    reply = HttpTransport(url).invoke(json.dumps(
        {"inputs": prompt, "parameters": {"max_new_tokens": 1}}).encode())
    return json.loads(reply.body)["details"], time.perf_counter() - began


def documents(texts: dict[str, str]) -> list[Document]:
    return [Document(name, body) for name, body in texts.items()]


def whole(tokens: int) -> int:
    return tokens // CHUNK * CHUNK


def verify_warmed(summary: WarmSummary, count: int, template: str = TEMPLATE) -> None:
    assert [r.outcome for r in summary.results] == [WARMED] * count, summary.results
    assert summary.ok and summary.lookups_answered is True
    assert summary.cached_tokens == 0
    assert all(r.prompt_tokens == len(wrap(template, text("x-0")).encode())
               for r in summary.results)  # a byte tokenizer; tags of equal length


def test_warm_a_folder_then_the_first_question_hits(endpoint, tmp_path):
    """Scenario: 3 documents warmed; a question over one (template prefix + document + the
    question) loads every whole chunk of the warmed prefix, as a repeated question would."""
    docs = read_documents(folder(tmp_path, "f"))
    assert [d.name for d in docs] == ["f-0.txt", "f-1.txt", "f-2.md"]
    summary = warm(docs, HttpTransport(endpoint.url), TEMPLATE, concurrency=2)
    verify_warmed(summary, 3)
    engine = endpoint.engine.metrics
    hits = engine.value("lookup_hit_tokens_total")
    prefix = wrap(TEMPLATE, docs[1].text)
    warmed, warm_ttft = ask(endpoint.url, prefix + "How long do I hold it?")
    assert warmed["cached_tokens"] == whole(len(prefix.encode())) > 0
    assert engine.value("lookup_hit_tokens_total") - hits == warmed["cached_tokens"]
    cold_prefix = wrap(TEMPLATE, text("f-9"))  # same length, never warmed
    cold, cold_ttft = ask(endpoint.url, cold_prefix + "How long do I hold it?")
    assert cold["cached_tokens"] == 0
    repeat, repeat_ttft = ask(endpoint.url, cold_prefix + "How long do I hold it?")
    assert repeat["cached_tokens"] >= whole(len(prefix.encode()))
    print(f"\nTTFT over {warmed['prompt_tokens']} tokens: cold {cold_ttft * 1000:.1f} ms, "
          f"after warm {warm_ttft * 1000:.1f} ms ({warmed['cached_tokens']} cached), "
          f"repeated {repeat_ttft * 1000:.1f} ms ({repeat['cached_tokens']} cached)")


def test_a_second_run_skips_every_document(endpoint, tmp_path):
    docs = read_documents(folder(tmp_path, "s"))
    transport = HttpTransport(endpoint.url)
    verify_warmed(warm(docs, transport, TEMPLATE), 3)
    stored = endpoint.engine.metrics.value("stored_tokens_total")
    again = warm(docs, transport, TEMPLATE)
    assert [r.outcome for r in again.results] == [SKIPPED] * 3
    assert again.cached_tokens == sum(whole(r.prompt_tokens) for r in again.results) > 0
    assert endpoint.engine.metrics.value("stored_tokens_total") == stored
    assert "3 skipped (already cached)" in again.lines()[0]


def test_jsonl_errors_are_per_document_and_the_rest_warm(endpoint, tmp_path):
    """Scenario: a JSONL with a line that is not JSON, one without text, one too long for the
    model (the server's 400) and two good ones: three failures named, two warmed."""
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": "a", "text": text("j-a")}), "{not json",
             json.dumps({"id": "b", "body": "no text field"}),
             json.dumps({"id": "huge", "text": "x" * 2000}), "",
             json.dumps({"text": text("j-c")})]
    path.write_text("\n".join(lines) + "\n")
    docs = read_documents(path)
    summary = warm(docs, HttpTransport(endpoint.url), TEMPLATE)
    outcomes = {r.name: (r.outcome, r.error) for r in summary.results}
    assert [r.name for r in summary.results] == ["a", "docs.jsonl:2", "b", "huge", "docs.jsonl:6"]
    assert outcomes["a"][0] == outcomes["docs.jsonl:6"][0] == WARMED
    assert outcomes["docs.jsonl:2"][0] == FAILED and "not JSON" in outcomes["docs.jsonl:2"][1]
    assert outcomes["b"] == (FAILED, "no text in field 'text'")
    assert outcomes["huge"][0] == FAILED and "HTTP 400" in outcomes["huge"][1]
    assert "context" in outcomes["huge"][1]
    assert not summary.ok and summary.count(WARMED) == 2
    assert ask(endpoint.url, wrap(TEMPLATE, text("j-c")) + "?")[0]["cached_tokens"] > 0


def test_a_document_under_a_chunk_is_warmed_with_a_note(endpoint):
    """Nothing of it can be kept (whole chunks only), so it is never skipped either."""
    for _ in range(2):
        summary = warm(documents({"tiny": "Hi."}), HttpTransport(endpoint.url))
        assert summary.results[0].outcome == WARMED
        assert summary.results[0].note == "shorter than a chunk (32 tokens): nothing of it is kept"


def test_chat_documents_hit_a_chat_question(endpoint):
    """Scenario: --chat warms the document as a system message; the application's chat request
    (that system message, then the user's question) finds it cached."""
    docs = documents({"chat-1": text("chat-1")})
    summary = warm(docs, HttpTransport(endpoint.url), CHAT_TEMPLATE, chat=True)
    assert summary.count(WARMED) == 1 and summary.lookups_answered
    system = wrap(CHAT_TEMPLATE, text("chat-1"))
    reply = HttpTransport(endpoint.url).invoke(json.dumps({"messages": [
        {"role": "system", "content": system}, {"role": "user", "content": "How long?"}],
        "max_tokens": 1}).encode())
    usage = json.loads(reply.body)["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == whole(len(f"<system>{system}\n"))


def test_an_endpoint_without_lookups_is_warmed_by_the_lookup_itself():
    """Scenario: a replica that ignores the lookup attribute (as LMI does) answers it with a
    generation: that was the warm request; one request per document, none skipped."""
    replica = SessionReplica("plain").start()
    try:
        docs = documents({f"d{i}": text(f"d{i}") for i in range(3)})
        summary = warm(docs, HttpTransport(replica.url), CHAT_TEMPLATE, chat=True)
        assert [r.outcome for r in summary.results] == [WARMED] * 3
        assert summary.lookups_answered is False and summary.ok
        assert "does not answer lookups" in summary.lines()[-1]
        seen = replica.inferences()
        assert len(seen) == 3 and all(s.body["max_tokens"] == 1 for s in seen)
        # key=value: DJL's front end (LMI) drops a custom attribute without '='.
        assert all(s.headers[CUSTOM_ATTRIBUTES] == "lmcache-ext-lookup=true" for s in seen)
    finally:
        replica.close()


def test_warm_through_boto3_and_the_router(endpoint, tmp_path):
    """Scenario: boto3's sagemaker-runtime (fake credentials) -> the router -> the replica: the
    lookup's custom attribute survives the router (answered as a lookup), so a second run skips
    every document."""
    router = Router([Backend.from_url(endpoint.url, "r0")], make_policy("random", seed=0)).start()
    try:
        docs = read_documents(folder(tmp_path, "b"))
        transport = SageMakerTransport("local", client=runtime(router.url))
        verify_warmed(warm(docs, transport, TEMPLATE), 3)
        again = warm(docs, transport, TEMPLATE)
        assert again.lookups_answered is True and again.count(SKIPPED) == 3
    finally:
        router.close()


def cli_env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**clean, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def test_the_command_through_the_router_as_a_process(endpoint, tmp_path):
    router = Router([Backend.from_url(endpoint.url, "r0")], make_policy("random", seed=0)).start()
    docs = folder(tmp_path, "p")
    template = tmp_path / "template.txt"
    template.write_text(TEMPLATE)
    command = [sys.executable, "-m", "lmcache_ext.cli", "warm", "--docs", str(docs),
               "--endpoint", "local", "--endpoint-url", router.url,
               "--template-file", str(template), "--concurrency", "2"]
    try:
        first = subprocess.run(command, capture_output=True, text=True, env=cli_env(),
                               timeout=60)
        second = subprocess.run(command, capture_output=True, text=True, env=cli_env(),
                                timeout=60)
    finally:
        router.close()
    assert first.returncode == 0, first.stderr
    assert "documents 3: 3 warmed, 0 skipped (already cached), 0 failed" in first.stdout
    assert second.returncode == 0, second.stderr
    assert "documents 3: 0 warmed, 3 skipped (already cached), 0 failed" in second.stdout
    print("\n" + first.stdout + second.stdout)


def test_an_interrupted_run_says_what_it_did_and_a_rerun_sends_only_the_rest(endpoint,
                                                                               tmp_path):
    """Scenario: Ctrl-C (SIGINT) once a few documents are answered: the command stops sending
    (exit 130) and says how many were done; the same command again skips those and warms the
    rest, so every document ends warmed once. The endpoint sits behind a 50 ms link (each
    request held that long), so the run lasts seconds whatever the machine's load: the signal
    comes while it runs, not after a fast run has already finished."""
    count = 60
    docs = folder(tmp_path, "i", count=count)
    template = tmp_path / "template.txt"
    template.write_text(TEMPLATE)
    host, port = endpoint.server.server_address[:2]
    link = SlowProxy(host, port, delay_s=0.05).start()
    command = [sys.executable, "-m", "lmcache_ext.cli", "warm", "--docs", str(docs),
               "--url", link.url("http"), "--template-file", str(template),
               "--concurrency", "1"]
    try:
        interrupt_then_rerun(link, command, count)
    finally:
        link.stop()


def interrupt_then_rerun(link: SlowProxy, command: list[str], count: int) -> None:
    """SIGINT the run once ``link`` has passed on its twelfth request, then rerun it: exit 130
    and a summary, then only the rest sent."""
    # The client opens a connection per request, a document takes a lookup and a completion,
    # one at a time: by the twelfth, at least five documents were answered. Counted at the
    # link (not from the engine's metrics), so the signal comes mid-run however loaded the
    # machine: a metric polled from here once lagged a whole fast run.
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=cli_env())
    deadline = time.monotonic() + 60
    while link.accepted < 12 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 130, out + err
    said = re.search(rf"interrupted: (\d+) of {count} documents done", out)
    assert said is not None, out
    done = int(said.group(1))
    assert 3 <= done < count, out
    second = subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    counts = re.search(rf"documents {count}: (\d+) warmed, (\d+) skipped", second.stdout)
    assert counts is not None, second.stdout
    warmed, skipped = int(counts.group(1)), int(counts.group(2))
    assert skipped >= done and warmed >= 1 and warmed + skipped == count, (out, second.stdout)
    print(f"\ninterrupted after {done} of {count}; the rerun warmed {warmed}, skipped {skipped}")


def test_exit_codes(endpoint, tmp_path, capsys):
    docs = folder(tmp_path, "e", count=1)
    url = ["--url", endpoint.url]
    assert main(["warm", "--docs", str(docs), *url, "--template", "no placeholder"]) == 2
    assert "{document}" in capsys.readouterr().err
    assert main(["warm", "--docs", str(docs)]) == 2  # no target
    assert main(["warm", "--docs", str(tmp_path / "missing"), *url]) == 2
    assert main(["warm", "--docs", str(docs), *url, "--concurrency", "0"]) == 2
    (docs / "huge.txt").write_text("x" * 2000)
    assert main(["warm", "--docs", str(docs), *url]) == 1
    out = capsys.readouterr()
    assert "FAILED huge.txt: EndpointError: HTTP 400" in out.err
    assert "1 warmed, 0 skipped (already cached), 1 failed" in out.out
    (docs / "huge.txt").unlink()
    assert main(["warm", "--docs", str(docs), *url]) == 0


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal_and_names_failures():
    stream = Terminal()
    progress = Progress(2, stream)
    summary = WarmSummary()
    for result in (DocumentResult("a.txt", WARMED, 64, 0), DocumentResult("b.txt", FAILED,
                                                                           error="HTTP 500: x")):
        summary.results.append(result)
        progress(result, summary)
    progress.end()
    shown = stream.getvalue()
    assert "\rwarm: 1/2 documents (1 warmed, 0 skipped, 0 failed)" in shown
    assert "\r\033[Kwarm: FAILED b.txt: HTTP 500: x\n" in shown
    assert shown.endswith("(1 warmed, 0 skipped, 1 failed) 0.0 s\n")
    quiet = io.StringIO()  # not a terminal: only the lines
    Progress(2, quiet)(summary.results[1], summary)
    assert quiet.getvalue() == "warm: FAILED b.txt: HTTP 500: x\n"
