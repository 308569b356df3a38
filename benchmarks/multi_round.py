"""Multi-round conversations over N replicas behind the router: routing modes against SageMaker
stateful sessions, with and without session pins.

U users talk R rounds each: a shared system prompt, then each user's growing history (every turn
sends the whole conversation). The users of a round send at once (a thread each); between rounds
every replica also serves one-off prompts from other traffic (``--churn``, a share of its CPU
tier), sent to it directly and not measured. N replicas of the built-in engine (SmolLM2-135M,
one model load shared) run in this process behind ``lmcache_ext.routing``'s router; each
replica's CPU tier is ``--tier-share`` times what its share of the users needs, so no replica
can hold every conversation. Modes, each on fresh replicas:

- ``random``, ``least_outstanding``, ``prefix_aware``: no sessions; the router's mode decides.
- ``sticky``: a session per conversation (the router keeps it on its replica); no pins
  (``session_pins_max_fraction: 0``), so other traffic may evict the conversation.
- ``sticky_pinned``: the same with the session pinning its conversation in the CPU tier.

Measured per turn by the client (``lmcache_ext.client``): TTFT (request sent -> first streamed
bytes), the prompt tokens and the cached tokens the server reports (``usage``). ``hit_rate`` =
history tokens loaded / history tokens sent over rounds 2..R, where a turn's history is the
previous turn's prompt (the part of this prompt the endpoint has seen). The server stores whole
chunks of prompts, so ``hit_ceiling`` (the whole chunks of that history) is the most any mode
can reach; ``turns_hit`` is the share of turns (rounds 2..R) that loaded all of it.

    python benchmarks/multi_round.py [--quick] [--replicas 2,4] [--json PATH] [--plot PATH]

``--workload rag``: retrieval-augmented questions, no sessions. D shared documents; in each of R
rounds U users each ask one new question about a document drawn at random (seeded), in a fresh
one-message conversation (a short shared system prompt, then the document, then the question).
Each replica's CPU tier holds ``--tier-share`` times its share of the documents (D / N), so a
replica that sees every document cannot keep them all. Modes: ``random``,
``least_outstanding`` and SageMaker's ``prefix_aware`` with the ``PrefixLength`` that
``lmcache-ext advise`` suggests for this workload (``suggest_prefix_length``: the shared system
prompt plus one chunk, in bytes of the body) and ``--concurrency-threshold``. ``hit_rate`` =
cached tokens / (system prompt + document) tokens over all requests; ``hit_ceiling`` = what one
cache for the whole endpoint could load (``rag_ceiling``: a document's first request loads only
the system prompt).

JSON: {"modes": {MODE: {"hit_rate", "hit_ceiling", "turns_hit", "ttft_p50_by_round",
"ttft_p90_by_round", "total_s", "served"}}} for the last (largest) replica count, and "runs"
with every count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmcache_ext.client import HttpTransport, SessionClient, Turn  # noqa: E402
from lmcache_ext.client.chat import ChatParams  # noqa: E402
from lmcache_ext.routing.policy import PrefixAware, make_policy  # noqa: E402
from lmcache_ext.routing.router import Router  # noqa: E402
from lmcache_ext.units import GIB  # noqa: E402

WORDS = ("river mountain ledger copper violet harbor signal orchard lantern meadow quartz "
         "compass glacier saddle timber beacon falcon velvet canyon marble").split()
TEMPLATE_TOKENS = 12  # chat-template tokens a turn adds around its two messages (estimate)


@dataclass(frozen=True)
class Mode:
    routing: str  # the router's mode for requests without a session (and for creates)
    sessions: bool
    pins: bool = False


MODES = {
    "random": Mode("random", sessions=False),
    "least_outstanding": Mode("least_outstanding", sessions=False),
    "prefix_aware": Mode("prefix_aware", sessions=False),
    "sticky": Mode("least_outstanding", sessions=True),
    "sticky_pinned": Mode("least_outstanding", sessions=True, pins=True),
}


@dataclass(frozen=True)
class Workload:
    users: int
    rounds: int
    system_tokens: int
    question_tokens: int
    answer_tokens: int
    chunk_size: int
    tier_share: float
    churn: float

    @property
    def final_tokens(self) -> int:
        """A conversation's prompt at its last round (estimate, for sizing the tiers)."""
        turn = self.question_tokens + self.answer_tokens + TEMPLATE_TOKENS
        return self.system_tokens + self.rounds * turn


def text_of(tokenizer, seed: str, tokens: int) -> str:
    """Distinct synthetic text of about ``tokens`` tokens."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(tokens * 2)]
    return tokenizer.decode(tokenizer(" ".join(words))["input_ids"][:tokens])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---------------------------------------------------------------- one mode


def engine_overrides(work: Workload, mode: Mode, replicas: int, bytes_per_token: int) -> dict:
    """Each replica's config: a CPU tier for ``tier_share`` of its share of the users."""
    per_user = work.final_tokens * bytes_per_token
    cpu_bytes = work.tier_share * -(-work.users // replicas) * per_user
    overrides = {"chunk_size": work.chunk_size, "max_local_cpu_size": cpu_bytes / GIB}
    if mode.sessions:
        overrides["enable_stateful_sessions"] = True
        overrides["session_pins_max_fraction"] = 0.9 if mode.pins else 0.0
        overrides["session_pin_max_gib"] = 2 * per_user / GIB
    return overrides


def churn(replicas, tokenizer, work: Workload, round_index: int, cpu_gib: float,
          bytes_per_token: int) -> None:
    """One-off prompts to every replica (other traffic): ``churn`` of its CPU tier."""
    tokens = int(work.churn * cpu_gib * GIB / bytes_per_token)
    piece = 1024
    for index, endpoint in enumerate(replicas.endpoints):
        transport = HttpTransport(endpoint.url)
        client = SessionClient(transport, params=ChatParams(max_tokens=1), sessions=False)
        for part in range(0, tokens, piece):
            seed = f"churn {round_index} {index} {part}"
            client.turn(seed, text_of(tokenizer, seed, min(piece, tokens - part)))


def run_mode(name: str, mode: Mode, work: Workload, replica_count: int, loaded,
             system_prompt: str, questions: list[list[str]]) -> dict:
    from lmcache_ext.chunk import ChunkMeta
    from lmcache_ext.config import load_config
    from lmcache_ext.routing.replicas import start_replicas

    shape = loaded.layout.shape(work.chunk_size)
    bytes_per_token = ChunkMeta(loaded.layout.dtype, shape, work.chunk_size).nbytes // \
        work.chunk_size
    overrides = engine_overrides(work, mode, replica_count, bytes_per_token)
    replicas = start_replicas(replica_count, load_config(env={}, overrides=overrides),
                              loaded=loaded)
    router = Router(replicas.backends, make_policy(mode.routing, seed=0)).start()
    client = SessionClient(HttpTransport(router.url), system_prompt=system_prompt,
                           params=ChatParams(max_tokens=work.answer_tokens, temperature=0.0),
                           sessions=mode.sessions)

    def turn(user: int, round_index: int) -> Turn:
        stream = client.stream_turn(f"user-{user}", questions[user][round_index])
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    rounds: list[list[Turn]] = []
    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(work.users) as pool:
            for round_index in range(work.rounds):
                rounds.append(list(pool.map(turn, range(work.users),
                                            [round_index] * work.users)))
                if work.churn:
                    churn(replicas, loaded.tokenizer, work, round_index,
                          overrides["max_local_cpu_size"], bytes_per_token)
        total_s = time.perf_counter() - began
        client.close_all()
        served = router.served()
    finally:
        router.close()
        replicas.close()
    return summarise(name, rounds, work.chunk_size, total_s, served)


def summarise(name: str, rounds: list[list[Turn]], chunk: int, total_s: float,
              served: list[int]) -> dict:
    loaded = history = ceiling = hits = turns = 0
    for previous, current in zip(rounds, rounds[1:], strict=False):
        for before, now in zip(previous, current, strict=True):
            whole = (before.prompt_tokens or 0) // chunk * chunk
            history += before.prompt_tokens or 0
            ceiling += whole
            loaded += now.cached_tokens or 0
            hits += (now.cached_tokens or 0) >= whole
            turns += 1
    return {"hit_rate": loaded / history if history else 0.0,
            "hit_ceiling": ceiling / history if history else 0.0,
            "turns_hit": hits / turns if turns else 0.0,
            "ttft_p50_by_round": [statistics.median(t.ttft_s for t in r) for r in rounds],
            "ttft_p90_by_round": [percentile([t.ttft_s for t in r], 0.9) for r in rounds],
            "prompt_tokens_by_round": [statistics.mean(t.prompt_tokens or 0 for t in r)
                                       for r in rounds],
            "total_s": total_s, "served": served}


# ---------------------------------------------------------------- RAG workload (no sessions)


@dataclass(frozen=True)
class RagWorkload:
    documents: int
    users: int
    rounds: int
    system_tokens: int
    document_tokens: int
    question_tokens: int
    answer_tokens: int
    chunk_size: int
    tier_share: float
    concurrency_threshold: int


RAG_MODES = ("random", "least_outstanding", "prefix_aware")


def rag_requests(work: RagWorkload) -> list[list[tuple[int, int]]]:
    """(user, document) pairs per round: each user asks about a document drawn at random."""
    rng = random.Random(27)
    return [[(user, rng.randrange(work.documents)) for user in range(work.users)]
            for _ in range(work.rounds)]


def run_rag_mode(mode: str, work: RagWorkload, replica_count: int, loaded, system_prompt: str,
                 documents: list[str], settings: PrefixAware) -> dict:
    from lmcache_ext.chunk import ChunkMeta
    from lmcache_ext.config import load_config
    from lmcache_ext.routing.replicas import start_replicas

    shape = loaded.layout.shape(work.chunk_size)
    bytes_per_token = ChunkMeta(loaded.layout.dtype, shape, work.chunk_size).nbytes // \
        work.chunk_size
    per_document = (work.system_tokens + work.document_tokens) * bytes_per_token
    cpu_bytes = work.tier_share * -(-work.documents // replica_count) * per_document
    config = load_config(env={}, overrides={"chunk_size": work.chunk_size,
                                            "max_local_cpu_size": cpu_bytes / GIB})
    replicas = start_replicas(replica_count, config, loaded=loaded)
    router = Router(replicas.backends, make_policy(mode, seed=0, settings=settings)).start()
    client = SessionClient(HttpTransport(router.url), system_prompt=system_prompt,
                           params=ChatParams(max_tokens=work.answer_tokens, temperature=0.0),
                           sessions=False)

    def ask(request: tuple[int, int, int]) -> tuple[int, Turn]:
        round_index, user, document = request
        question = text_of(loaded.tokenizer, f"rag q{round_index}.{user}", work.question_tokens)
        stream = client.stream_turn(f"r{round_index}-u{user}",
                                    f"{documents[document]}\n\nQuestion: {question}")
        for _ in stream:
            pass
        assert stream.result is not None
        return document, stream.result

    answered: list[list[tuple[int, Turn]]] = []
    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(work.users) as pool:
            for round_index, pairs in enumerate(rag_requests(work)):
                answered.append(list(pool.map(ask, [(round_index, u, d) for u, d in pairs])))
        total_s = time.perf_counter() - began
        served = router.served()
    finally:
        router.close()
        replicas.close()
    return summarise_rag(answered, work, total_s, served)


def rag_shared_tokens(work: RagWorkload) -> int:
    """The whole chunks of system prompt + document: what a request can load (estimate: the
    chat template's few tokens left out)."""
    return (work.system_tokens + work.document_tokens) // work.chunk_size * work.chunk_size


def rag_ceiling(work: RagWorkload, documents: list[int]) -> float:
    """The hit rate one cache for the whole endpoint could reach on requests for
    ``documents`` in this order: a document's first request loads only the system prompt
    (nothing, the very first), every later one all of it."""
    shared = rag_shared_tokens(work)
    system = work.system_tokens // work.chunk_size * work.chunk_size
    seen: set[int] = set()
    possible = 0
    for index, document in enumerate(documents):
        possible += shared if document in seen else system if index else 0
        seen.add(document)
    return possible / (shared * len(documents))


def summarise_rag(answered: list[list[tuple[int, Turn]]], work: RagWorkload, total_s: float,
                  served: list[int]) -> dict:
    shared = rag_shared_tokens(work)
    turns = [pair for round_ in answered for pair in round_]
    cached = sum(min(turn.cached_tokens or 0, shared) for _, turn in turns)
    ttfts = [turn.ttft_s for _, turn in turns]
    repeat_ttfts = [turn.ttft_s for index, (document, turn) in enumerate(turns)
                    if any(d == document for d, _ in turns[:index])]
    return {"hit_rate": cached / (shared * len(turns)),
            "requests_hit": sum((t.cached_tokens or 0) >= shared for _, t in turns) / len(turns),
            "ttft_p50": statistics.median(ttfts), "ttft_p90": percentile(ttfts, 0.9),
            "ttft_p50_repeat": statistics.median(repeat_ttfts) if repeat_ttfts else None,
            "total_s": total_s, "served": served}


def print_rag_table(report: dict) -> None:
    work = report["workload"]
    print(f"\nRAG: {work['documents']} documents x {work['document_tokens']} tokens, "
          f"{work['users']} users x {work['rounds']} rounds, no sessions; prefix_aware "
          f"PrefixLength {report['prefix_length']} B, ConcurrencyThreshold "
          f"{work['concurrency_threshold']}; hit ceiling {report['hit_ceiling']:.1%} (TTFT "
          f"seconds; reqs = requests that loaded all of it; repeat = requests for a document "
          f"asked before)")
    for count, run in report["runs"].items():
        print(f"{count} replicas\n{'mode':<19}{'hit':>7}{'reqs':>6}{'p50':>8}"
              f"{'p90':>8}{'p50 rep':>9}{'total':>8}  requests per replica")
        for name, row in run["modes"].items():
            repeat = row["ttft_p50_repeat"] or float("nan")
            print(f"{name:<19}{row['hit_rate']:>7.1%}{row['requests_hit']:>6.0%}{row['ttft_p50']:>8.3f}{row['ttft_p90']:>8.3f}"
                  f"{repeat:>9.3f}{row['total_s']:>8.1f}  {row['served']}")


def main_rag(args: argparse.Namespace, loaded) -> int:
    from lmcache_ext.sizing.advisor import suggest_prefix_length

    work = RagWorkload(args.documents, args.users, args.rounds, args.system_tokens,
                       args.document_tokens, args.question_tokens, args.answer_tokens,
                       args.chunk_size, args.tier_share, args.concurrency_threshold)
    system_prompt = "Answer from the document below.\n" + \
        text_of(loaded.tokenizer, "rag system", work.system_tokens)
    documents = [f"Document {d}: " + text_of(loaded.tokenizer, f"doc {d}", work.document_tokens)
                 for d in range(work.documents)]
    bytes_per_token = len(documents[0].encode()) / work.document_tokens
    advice = suggest_prefix_length(work.chunk_size, work.system_tokens, work.document_tokens,
                                   bytes_per_token)
    print(f"PrefixLength {advice.prefix_length}: {advice.reason}", file=sys.stderr)
    settings = PrefixAware(advice.prefix_length, work.concurrency_threshold)
    report: dict = {"workload_kind": "rag", "model": loaded.name,
                    "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
                    "workload": vars(work), "prefix_length": advice.prefix_length,
                    "prefix_length_rule": advice.reason, "hit_ceiling": rag_ceiling(
                        work, [d for round_ in rag_requests(work) for _, d in round_]),
                    "runs": {}}
    for count in [int(n) for n in args.replicas.split(",")]:
        run = report["runs"][str(count)] = {"modes": {}}
        for mode in args.modes.split(","):
            print(f"{count} replicas: rag {mode} ...", file=sys.stderr, flush=True)
            run["modes"][mode] = run_rag_mode(mode, work, count, loaded, system_prompt,
                                              documents, settings)
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=2))
    print_rag_table(report)
    return 0


# ---------------------------------------------------------------- report


def print_table(report: dict) -> None:
    work = report["workload"]
    for count, run in report["runs"].items():
        print(f"\n{count} replicas, {work['users']} users x {work['rounds']} rounds "
              f"(TTFT seconds; hit = history tokens loaded / sent, rounds 2..R; turns = turns that "
              f"loaded all of it)")
        print(f"{'mode':<19}{'hit':>7}{'ceiling':>9}{'turns':>7}{'p50 r2':>8}{'p50 rR':>8}"
              f"{'rR/r2':>7}{'p90 rR':>8}{'total':>8}  requests per replica")
        for name, row in run["modes"].items():
            p50 = row["ttft_p50_by_round"]
            ratio = p50[-1] / p50[1] if len(p50) > 1 else float("nan")
            print(f"{name:<19}{row['hit_rate']:>7.1%}{row['hit_ceiling']:>9.1%}"
                  f"{row['turns_hit']:>7.0%}"
                  f"{p50[min(1, len(p50) - 1)]:>8.3f}{p50[-1]:>8.3f}{ratio:>6.2f}x"
                  f"{row['ttft_p90_by_round'][-1]:>8.3f}{row['total_s']:>8.1f}  "
                  f"{row['served']}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    figure, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.5), squeeze=False)
    for axis, (count, run) in zip(axes[0], runs.items(), strict=True):
        for name, row in run["modes"].items():
            values = row["ttft_p50_by_round"]
            axis.plot(range(1, len(values) + 1), values, marker="o",
                      label=f"{name} (hit {row['hit_rate']:.0%})")
        axis.set_xticks(range(1, report["workload"]["rounds"] + 1))
        axis.set(xlabel="round", ylabel="TTFT p50 (s)", ylim=(0, None),
                 title=f"{count} replicas, {report['workload']['users']} users")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"Multi-round chat, {report['model']} on {report['machine']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", default="2,4", help="replica counts, comma-separated")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--system-tokens", type=int, default=128)
    parser.add_argument("--question-tokens", type=int, default=96)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the replicas share this process's CPUs; one "
                             "thread each avoids oversubscribing them)")
    parser.add_argument("--tier-share", type=float, default=1.25,
                        help="each replica's CPU tier / what its share of the users needs")
    parser.add_argument("--churn", type=float, default=0.5,
                        help="other traffic per replica per round, as a share of its CPU tier")
    parser.add_argument("--modes", help="modes, comma-separated (default: all of the "
                                         "workload's)")
    parser.add_argument("--workload", choices=("chat", "rag"), default="chat",
                        help="chat: multi-round conversations; rag: shared documents, no "
                             "sessions (module docstring)")
    parser.add_argument("--documents", type=int, default=12, help="rag: shared documents")
    parser.add_argument("--document-tokens", type=int, default=256, help="rag: per document")
    parser.add_argument("--concurrency-threshold", type=int, default=4,
                        help="rag, prefix_aware: SageMaker's ConcurrencyThreshold")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--plot", help="write a PNG of TTFT p50 by round here")
    args = parser.parse_args()
    rag = args.workload == "rag"
    if args.quick:
        args.replicas, args.users, args.rounds = "3", 3, 4
        args.system_tokens, args.question_tokens, args.answer_tokens = 64, 48, 8
        if rag:
            args.users, args.documents, args.document_tokens = 6, 6, 192
            args.system_tokens, args.question_tokens = 32, 16
    known = RAG_MODES if rag else tuple(MODES)
    args.modes = args.modes or ",".join(known)
    unknown = set(args.modes.split(",")) - set(known)
    if unknown:
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    return args


def main() -> int:
    args = parse_args()
    import torch

    from lmcache_ext.serving.model import load_model

    torch.set_num_threads(args.threads)

    loaded = load_model(None)
    if args.workload == "rag":
        return main_rag(args, loaded)
    work = Workload(args.users, args.rounds, args.system_tokens, args.question_tokens,
                    args.answer_tokens, args.chunk_size, args.tier_share, args.churn)
    system_prompt = "You answer questions about the records below.\n" + \
        text_of(loaded.tokenizer, "system", work.system_tokens)
    questions = [[f"User {u}, question {r}: " + text_of(loaded.tokenizer, f"q{u}.{r}",
                                                         work.question_tokens)
                  for r in range(work.rounds)] for u in range(work.users)]
    report: dict = {"model": loaded.name, "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
                    "workload": vars(work), "runs": {}}
    for count in [int(n) for n in args.replicas.split(",")]:
        run = report["runs"][str(count)] = {"modes": {}}
        for name in args.modes.split(","):
            print(f"{count} replicas: {name} ...", file=sys.stderr, flush=True)
            run["modes"][name] = run_mode(name, MODES[name], work, count, loaded,
                                          system_prompt, questions)
            report["modes"] = run["modes"]
            if args.json:  # after each mode: a long run that is stopped keeps what it measured
                Path(args.json).write_text(json.dumps(report, indent=2))
    print_table(report)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
