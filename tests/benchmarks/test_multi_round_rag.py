"""benchmarks/multi_round.py's RAG workload: its request plan and its figures' arithmetic (the
run itself needs minutes of CPU; docs/BENCHMARKS.md has its figures)."""

from __future__ import annotations

import importlib

from lmcache_ext.client.conversations import Turn


def _bench():
    return importlib.import_module("multi_round")  # benchmarks/ is on the path (conftest)


def turn(cached: int, ttft_s: float = 1.0) -> Turn:
    return Turn("c", "", None, 300, cached, ttft_s, ttft_s, False)


def work(bench, **changes):
    fields = dict(documents=2, users=2, rounds=2, system_tokens=32, document_tokens=96,
                  question_tokens=8, answer_tokens=2, chunk_size=16, tier_share=1.0,
                  concurrency_threshold=4)
    return bench.RagWorkload(**{**fields, **changes})


def test_each_round_asks_every_user_about_a_drawn_document():
    bench = _bench()
    plan = bench.rag_requests(work(bench, documents=5, users=4, rounds=3))
    assert [len(r) for r in plan] == [4, 4, 4]
    assert all(user == i and 0 <= doc < 5 for r in plan for i, (user, doc) in enumerate(r))
    assert plan == bench.rag_requests(work(bench, documents=5, users=4, rounds=3))  # seeded


def test_the_ceiling_misses_each_documents_first_request_but_its_system_prompt():
    bench = _bench()
    # 128 shared tokens (32 system + 96 document): 0 + 32 (document 1 new, system cached) + 128
    # + 128 of 4 x 128
    assert bench.rag_ceiling(work(bench), [0, 1, 0, 1]) == (32 + 128 + 128) / (4 * 128)
    assert bench.rag_ceiling(work(bench), [0, 0]) == 0.5


def test_hit_rate_counts_the_shared_prefix_and_the_ceiling_misses_each_first_request():
    """Scenario: two documents, each asked in both rounds: round 1 misses both; round 2 loads
    document 0's whole prefix (and more, not counted) and 64 tokens of document 1's."""
    bench = _bench()
    shared = 128  # 32 + 96 tokens, whole 16-token chunks
    answered = [[(0, turn(0, 3.0)), (1, turn(0, 3.0))],
                [(0, turn(shared + 40, 1.0)), (1, turn(64, 2.0))]]
    row = bench.summarise_rag(answered, work(bench), total_s=9.0, served=[2, 2])
    assert row["hit_rate"] == (shared + 64) / (4 * shared)  # cached beyond the prefix not counted
    assert row["requests_hit"] == 0.25
    assert row["ttft_p50_repeat"] == 1.5 and row["ttft_p50"] == 2.5
