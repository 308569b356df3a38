"""Conversations through a scale-in: 3 replicas + Redis behind the router, users in sessions.

Real processes, as ``lmcache_ext.testing.local_sagemaker`` starts them (redis-server, each
replica the container entrypoint -> ``lmcache-ext serve``, ``lmcache-ext route`` in front).
Users hold conversations through ``lmcache_ext.client`` (one session each, the whole history
resent every turn). After ``kill_after`` rounds, replica 0 is stopped; its users' next turns
find their sessions unknown, re-create them on the replicas left and resend the history. Three
runs, each on fresh processes:

- ``drain``: SIGTERM; the replica drains its sessions' pinned chunks to Redis, then exits;
- ``crash``: SIGKILL; only what was written behind already is in Redis (the yardstick);
- ``no_shared_tier``: SIGTERM, no Redis; the history is recomputed (no peer hands it over).

The replicas' write-behind queue is short (``queue_chunks``): the shared tier falls behind a
burst of stores and drops some (counted), as a remote store under load does. That gap is what a
crash loses and a drain writes.

Figures per run: ``failed_turns``; ``next_turn_after_drain_s`` (mean time of the turns that
re-created a session) against ``warm_turn_s`` (mean time of the other turns after the first,
same run) and their ratio; ``history_tokens_recomputed``: over the re-created turns, the whole
chunks of the history (the previous turn's prompt) not loaded from any cache.

    python benchmarks/scale_in.py [--quick] [--json PATH] [--plot PATH] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmcache_ext.client import HttpTransport, SessionClient
from lmcache_ext.client.chat import ChatParams
from lmcache_ext.client.conversations import Turn
from lmcache_ext.testing.local_sagemaker import LocalSageMaker

CHUNK = 256  # the seed's CPU config
SYSTEM = "You are a bookshop's support assistant. Answer briefly."  # under a chunk: not shared
WORDS = ("novel", "atlas", "poetry", "receipt", "refund", "parcel", "invoice", "paperback",
         "hardcover", "voucher", "courier", "delayed", "damaged", "exchange", "edition")
RUNS = {"drain": (signal.SIGTERM, True), "crash": (signal.SIGKILL, True),
        "no_shared_tier": (signal.SIGTERM, False)}


@dataclass(frozen=True)
class Setting:
    users: int
    rounds: int
    kill_after: int
    max_tokens: int
    history_words: int  # each user's own order history, sent in the first turn
    queue_chunks: int  # write_behind_queue_chunks of the replicas


SETTINGS = {"quick": Setting(users=9, rounds=4, kill_after=2, max_tokens=8, history_words=100,
                             queue_chunks=2),
            "full": Setting(users=12, rounds=6, kill_after=3, max_tokens=16,
                            history_words=250, queue_chunks=2)}


@dataclass
class Record:
    """The turns of one run, and the failures."""

    turns: list[tuple[int, Turn, int | None]] = field(default_factory=list)  # round, turn,
    failures: list[str] = field(default_factory=list)  # previous prompt tokens
    lock: threading.Lock = field(default_factory=threading.Lock)


def question(user: int, round_: int, history_words: int) -> str:
    """Round 0 carries the user's own order history (no chunk in common with other users)."""
    ask = f"Customer {user}, question {round_}: can I return order {user * 7 + round_}?"
    if round_:
        return ask
    rng = random.Random(user)
    history = " ".join(f"{rng.choice(WORDS)}-{rng.randrange(10_000)}"
                       for _ in range(history_words))
    return f"My orders: {history}\n{ask}"


def user_rounds(client: SessionClient, user: int, rounds: range, record: Record,
                previous: dict[int, int | None], history_words: int) -> None:
    for round_ in rounds:
        try:
            turn = client.turn(f"user-{user}", question(user, round_, history_words))
        except Exception as exc:  # a failed turn is the figure, not the end of the run
            with record.lock:
                record.failures.append(f"user {user} round {round_}: {exc}")
            continue
        with record.lock:
            record.turns.append((round_, turn, previous.get(user)))
        previous[user] = turn.prompt_tokens


def play(client: SessionClient, setting: Setting, rounds: range, record: Record,
         previous: dict[int, int | None]) -> None:
    """Every user plays ``rounds`` in parallel (one thread per user)."""
    threads = [threading.Thread(target=user_rounds, args=(client, u, rounds, record, previous,
                                                          setting.history_words))
               for u in range(setting.users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_once(name: str, setting: Setting, model: Path, workdir: Path) -> dict:
    """One run on fresh processes: rounds, the stop of replica 0, the rest of the rounds."""
    how, shared = RUNS[name]
    extra = {"OPTION_LMCACHE_COST_AWARE_RETRIEVAL": "false",  # load every hit: count them
             # A short queue: the shared tier falls behind a burst of stores (what it drops
             # is counted), as a remote store under load does; the drain's margin is there.
             "OPTION_LMCACHE_WRITE_BEHIND_QUEUE_CHUNKS": str(setting.queue_chunks)}
    local = LocalSageMaker(workdir, model, replicas=3, extra_env=extra, shared_tier=shared,
                           start_timeout_s=600).start()
    try:
        client = SessionClient(HttpTransport(local.url, timeout_s=300), system_prompt=SYSTEM,
                               params=ChatParams(max_tokens=setting.max_tokens))
        record, previous = Record(), {}
        play(client, setting, range(setting.kill_after), record, previous)
        began = time.monotonic()
        local.processes[0].send_signal(how)
        local.processes[0].wait(timeout=60)
        stop_s = time.monotonic() - began
        play(client, setting, range(setting.kill_after, setting.rounds), record, previous)
        figures = summarize(record, setting)
        figures.update(stop_s=round(stop_s, 2), exit_code=local.processes[0].returncode,
                       drain_log=[line for line in local.log(0).splitlines()
                                  if "sessions.drain" in line or "SIGTERM" in line])
        return figures
    finally:
        local.close()


def summarize(record: Record, setting: Setting) -> dict:
    after = [(r, t, p) for r, t, p in record.turns if r >= setting.kill_after]
    recreated = [(t, p) for _, t, p in after if t.recreated]
    warm = [t.total_s for r, t, _ in record.turns if r > 0 and not t.recreated]
    recomputed = sum(max(0, (p or 0) // CHUNK * CHUNK - (t.cached_tokens or 0))
                     for t, p in recreated)
    next_s = statistics.mean(t.total_s for t, _ in recreated) if recreated else None
    warm_s = statistics.mean(warm) if warm else None
    return {"turns": len(record.turns), "failed_turns": len(record.failures),
            "failures": record.failures[:5], "recreated_turns": len(recreated),
            "next_turn_after_drain_s": _round(next_s), "warm_turn_s": _round(warm_s),
            "ratio": _round(next_s / warm_s if next_s and warm_s else None),
            "history_tokens": sum((p or 0) // CHUNK * CHUNK for _, p in recreated),
            "history_tokens_recomputed": recomputed}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run(mode: str, model: Path | None = None, runs: tuple[str, ...] = tuple(RUNS)) -> dict:
    """Every run of ``mode`` ("quick" or "full"); the tiny random model without ``model``."""
    setting = SETTINGS[mode]
    with tempfile.TemporaryDirectory(prefix="scale-in-") as tmp:
        if model is None:
            from lmcache_ext.testing.tiny_model import build_tiny_model

            model = build_tiny_model(Path(tmp) / "model", max_context=8192)
        results = {}
        for name in runs:
            workdir = Path(tmp) / name
            workdir.mkdir()
            results[name] = run_once(name, setting, model, workdir)
    return {"mode": mode, "setting": setting.__dict__, "model": str(model),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "runs": results}


def table(report: dict) -> str:
    head = (f"{'run':<15}{'turns':>6}{'failed':>7}{'recreated':>10}{'next s':>8}"
            f"{'warm s':>8}{'ratio':>7}{'history':>9}{'recomputed':>11}")
    lines = [head]
    for name, f in report["runs"].items():
        lines.append(f"{name:<15}{f['turns']:>6}{f['failed_turns']:>7}{f['recreated_turns']:>10}"
                     f"{_text(f['next_turn_after_drain_s']):>8}{_text(f['warm_turn_s']):>8}"
                     f"{_text(f['ratio']):>7}{f['history_tokens']:>9}"
                     f"{f['history_tokens_recomputed']:>11}")
    return "\n".join(lines)


def _text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["runs"])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    runs = report["runs"]
    axes[0].bar(names, [runs[n]["next_turn_after_drain_s"] or 0 for n in names],
                label="re-created turn")
    axes[0].plot(names, [runs[n]["warm_turn_s"] or 0 for n in names], "k_", markersize=30,
                 label="warm turn")
    axes[0].set_ylabel("seconds")
    axes[0].legend()
    axes[1].bar(names, [runs[n]["history_tokens_recomputed"] for n in names])
    axes[1].set_ylabel("history tokens recomputed")
    figure.suptitle(f"scale-in ({report['mode']}): 3 replicas, replica 0 stopped midway")
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="9 users, 4 rounds")
    parser.add_argument("--model", type=Path, help="HF model folder (default: a tiny random "
                                                    "Llama, byte tokenizer)")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated: "
                                                               + ", ".join(RUNS))
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", help="write a PNG here")
    args = parser.parse_args()
    runs = tuple(r for r in args.runs.split(",") if r)
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {', '.join(unknown)}")
    report = run("quick" if args.quick else "full", args.model, runs)
    report["command"] = " ".join(["python", *sys.argv])
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
