"""TTFT of the first question over a document: cold, after ``lmcache-ext warm``, and repeated.

The built-in engine (default model SmolLM2-135M, CPU tier) in this process; documents of about
2,700 tokens under a ChatML system prompt, the question after it. Per trial: a question over a
new document (cold), ``warm`` of another new document then the first question over it, and the
first question again (a repeat). Prints each trial and the medians' ratios.

    python benchmarks/warm.py [--trials 3] [--json docs/warm.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from lmcache_ext.client import Document, HttpTransport, warm
from lmcache_ext.client.warm import wrap
from lmcache_ext.config import load_config
from lmcache_ext.serving.app import build_endpoint

TEMPLATE = ("<|im_start|>system\nAnswer from this document.\n\n{document}<|im_end|>\n"
            "<|im_start|>user\n")
QUESTION = "When is part 63 delivered?<|im_end|>\n<|im_start|>assistant\n"


def document(tag: str) -> str:
    return " ".join(f"{tag} clause {i}: the supplier delivers part {i * 7} within {i % 9 + 2} "
                    f"days of the order and replaces faulty units at no cost." for i in range(90))


def ask(transport: HttpTransport, text: str) -> tuple[float, dict]:
    """Client-side TTFT of one new token, and the answer's details."""
    body = {"inputs": wrap(TEMPLATE, text) + QUESTION, "parameters": {"max_new_tokens": 1}}
    began = time.perf_counter()
    details = json.loads(transport.invoke(json.dumps(body).encode()).body)["details"]
    return time.perf_counter() - began, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    endpoint = build_endpoint(load_config(env={}, overrides={"max_local_cpu_size": 1.0}), None,
                              "127.0.0.1", 0)
    threading.Thread(target=endpoint.server.serve_forever, daemon=True).start()
    transport = HttpTransport(endpoint.url)
    rows = []
    try:
        ask(transport, document("warm-up"))
        for trial in range(args.trials):
            cold_s, cold = ask(transport, document(f"cold-{trial}"))
            summary = warm([Document(f"doc-{trial}", document(f"warmed-{trial}"))], transport,
                           TEMPLATE)
            after_s, after = ask(transport, document(f"warmed-{trial}"))
            repeat_s, repeat = ask(transport, document(f"cold-{trial}"))
            rows.append({"prompt_tokens": cold["prompt_tokens"], "cold_s": cold_s,
                         "warm_run_s": summary.seconds, "after_warm_s": after_s,
                         "after_warm_cached": after["cached_tokens"], "repeat_s": repeat_s,
                         "repeat_cached": repeat["cached_tokens"]})
            print(f"trial {trial}: {cold['prompt_tokens']} tokens; cold {cold_s:.3f} s; warm run "
                  f"{summary.seconds:.3f} s; first question after warm {after_s:.3f} s "
                  f"({after['cached_tokens']} cached); repeat {repeat_s:.3f} s "
                  f"({repeat['cached_tokens']} cached)", flush=True)
    finally:
        endpoint.close()
    cold = statistics.median(r["cold_s"] for r in rows)
    after = statistics.median(r["after_warm_s"] for r in rows)
    repeat = statistics.median(r["repeat_s"] for r in rows)
    print(f"medians: cold {cold:.3f} s, after warm {after:.3f} s ({cold / after:.1f}x faster), "
          f"repeat {repeat:.3f} s (after warm / repeat {after / repeat:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"trials": rows, "cold_s": cold, "after_warm_s": after,
                                         "repeat_s": repeat}, indent=2) + "\n")


if __name__ == "__main__":
    main()
