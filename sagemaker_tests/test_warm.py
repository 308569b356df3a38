"""``lmcache-ext warm`` against the endpoint through boto3: after warming, the first real question
over a warmed document is a hit; a second run skips what is cached (where the endpoint answers
lookups)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from lmcache_ext.client import SageMakerTransport, read_documents, warm
from lmcache_ext.client.warm import parse_answer, warm_body, wrap
from lmcache_ext.wire import LOOKUP_REQUEST

# The application's prompt: the document under an instruction, then the question.
TEMPLATE = "Answer only from this document.\n\n{document}\n\nQuestion: "
DOCUMENTS = {
    "tiers.txt": "The CPU tier keeps chunks in host memory; the disk tier writes them with "
                 "O_DIRECT; the shared tier lives in Redis. " * 5,
    "sessions.txt": "A stateful session keeps a conversation on the instance that created it, "
                    "so each turn finds the turns before it in the cache. " * 5,
}


def question(document: str, words: str) -> dict:
    return {"inputs": TEMPLATE.replace("{document}", document) + words,
            "parameters": {"max_new_tokens": 4, "do_sample": False}}


def run_warm(target, folder, *extra: str) -> subprocess.CompletedProcess:
    """The command as a user runs it, with the suite's AWS settings (for the local endpoint:
    fake credentials and ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME``)."""
    env = dict(os.environ)
    if target.local_runtime:
        env.update(AWS_ACCESS_KEY_ID="local", AWS_SECRET_ACCESS_KEY="local",
                   AWS_DEFAULT_REGION=target.region)
    return subprocess.run(
        [sys.executable, "-m", "lmcache_ext.cli", "warm", "--docs", str(folder), "--endpoint",
         target.endpoint_name, "--template", TEMPLATE, "--concurrency", "2", *extra],
        env=env, capture_output=True, text=True, timeout=300)


def wait_until_stored(transport, documents, within_s: float = 30.0) -> None:
    """Lookups (no generation) until every document's whole chunks are held, or the deadline:
    a request's chunks are stored after its answer (the connector's saver thread, then the
    shared tier), and a lookup counts what has landed, on whichever instance it reaches."""
    deadline = time.monotonic() + within_s
    for document in documents:
        body = warm_body(wrap(TEMPLATE, document.text))
        while time.monotonic() < deadline:
            answer = parse_answer(transport.invoke(body, custom_attributes=LOOKUP_REQUEST).body)
            if not answer.lookup or not answer.chunk_tokens:
                return  # not answered as a lookup: nothing to wait for
            whole = (answer.prompt_tokens or 0) // answer.chunk_tokens * answer.chunk_tokens
            if (answer.cached_tokens or 0) >= whole:
                break
            time.sleep(0.5)


def test_warm_then_the_first_question_is_a_hit(target, boto3_client, tmp_path):
    """Scenario: pre-warm two documents with the command, then ask the first question over one
    of them, and one over a document nobody warmed (the same length): the warmed one is served
    from the cache."""
    tag = f"({tmp_path.name}) "  # documents new to the endpoint, whatever ran before
    for name, text in DOCUMENTS.items():
        (tmp_path / name).write_text(tag + text * target.document_scale)
    done = run_warm(target, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "documents 2: 2 warmed, 0 skipped (already cached), 0 failed" in done.stdout, \
        done.stdout

    warmed_doc = tag + DOCUMENTS["tiers.txt"] * target.document_scale
    cold_doc = tag + DOCUMENTS["tiers.txt"].upper() * target.document_scale
    start = time.perf_counter()
    warm_reply = boto3_client.invoke(question(warmed_doc, "what holds the chunks?")).json()
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    cold_reply = boto3_client.invoke(question(cold_doc, "what holds the chunks?")).json()
    cold_s = time.perf_counter() - start
    print(f"question over a warmed document {warm_s:.3f} s, over a cold one {cold_s:.3f} s")
    if target.reports_cached_tokens:
        prefix_tokens = len(TEMPLATE.replace("{document}", warmed_doc))  # a token per byte
        whole_chunks = prefix_tokens // target.chunk_tokens * target.chunk_tokens
        assert warm_reply["details"]["cached_tokens"] >= whole_chunks > 0
        assert cold_reply["details"]["cached_tokens"] == 0
    else:
        assert warm_s < cold_s


def test_a_second_warm_skips_what_is_cached(target, tmp_path):
    """Resumable: the second run looks each document up and skips it (an endpoint that does not
    answer lookups, such as LMI's own handler, warms everything again)."""
    for name, text in DOCUMENTS.items():  # a chunk or more in the endpoint's tokens: a
        # document shorter than a chunk keeps nothing to skip (warm says so)
        (tmp_path / name).write_text(f"({tmp_path.name}) {text * target.document_scale}")
    transport = SageMakerTransport(target.endpoint_name, client=target.runtime())
    documents = read_documents(tmp_path)
    first = warm(documents, transport, TEMPLATE, concurrency=2)
    assert first.ok and first.count("warmed") == 2
    if target.answers_lookups:
        wait_until_stored(transport, documents)
    second = warm(documents, transport, TEMPLATE, concurrency=2)
    assert second.ok
    if target.answers_lookups:
        assert second.lookups_answered is True
        assert second.count("skipped") == 2, second.lines()
        assert second.cached_tokens >= 2 * target.chunk_tokens
    done = run_warm(target, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    if target.answers_lookups:
        assert "0 warmed, 2 skipped" in done.stdout, done.stdout
