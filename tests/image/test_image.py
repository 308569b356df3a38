"""Our image serving real requests with the cache on, in containers (issue 23 a to f).

The seed's configs (container/lmcache_config_*.yaml) are mounted in the model directory and the
seed's env vars (sagemaker_tests/seed.env) set, as a user runs the image. Prompts are token ids
(LMI's ``inputs``) of natural text (``text_prompt``: windows of the repository's prose that no
two prompts share), answers greedy and compared for equality: with and without the cache they
must be the same. vLLM's own prefix cache is off (``OPTION_ENABLE_PREFIX_CACHING=false``), so
every cached token reported is lmcache-ext's. The cache's counters (forged, corrupt, loaded per
tier) are read as an operator reads them on SageMaker: the CloudWatch EMF lines in the
container's log (``emf_totals``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from lmcache_ext.testing.redis_server import RedisServer
from lmcache_ext.testing.vllm_engine import text_prompt
from sagemaker_tests.conftest import ENDPOINT_ENV, RUNTIME_NAME_ENV, RUNTIME_URL_ENV
from sagemaker_tests.deployment import SESSIONS_DEFAULTS
from sagemaker_tests.envfile import read_env_file
from tests.image.conftest import STAND_IN, Containers, make_model_dir
from tests.image.containers import REPO, Container, ContainerSpec, free_port

SEED_ENV = read_env_file(REPO / "sagemaker_tests" / "seed.env")
NO_VLLM_PREFIX_CACHE = {"OPTION_ENABLE_PREFIX_CACHING": "false"}
EMF_EVERY_S = {"OPTION_LMCACHE_EMF_INTERVAL_S": "1"}  # the counters in the log within seconds
# A 135M model on a busy 2-CPU machine prefills so fast that the cost model may rightly
# recompute part of a hit (its choices: tests/adapters/vllm/test_cost.py); where a test counts
# where hits come from, every hit is taken.
EVERY_HIT = {"OPTION_LMCACHE_COST_AWARE_RETRIEVAL": "false"}
CHUNK = 256  # the seed's chunk_size
FULL_CHUNKS_2K = 2048 // CHUNK * CHUNK - CHUNK  # vLLM computes at least the last token
NUDGE = text_prompt(16, 30000)  # shorter than a chunk: stores and loads nothing


def ask(prompt: list[int], tokens: int = 8) -> dict:
    """LMI's schema, greedy."""
    return {"inputs": prompt, "parameters": {"max_new_tokens": tokens, "temperature": 0.0,
                                             "ignore_eos": True}}


def answer(reply) -> tuple[list[int], int]:
    """(output token ids, cached prompt tokens) of a 200 reply."""
    assert reply.code == 200, reply.body
    return reply.body["choices"][0]["token_ids"], \
        reply.body["usage"]["prompt_tokens_details"]["cached_tokens"]


def with_config(model_dir, name: str):
    shutil.copy(REPO / "container" / name, model_dir / "lmcache_config.yaml")
    return model_dir


def emf_documents(server: Container) -> list[dict]:
    """The container's CloudWatch EMF lines so far (its stdout, across restarts), decoded."""
    done = subprocess.run(["docker", "logs", server.name], capture_output=True, text=True)
    return [json.loads(line[line.find('{"_aws"'):]) for line in done.stdout.splitlines()
            if '{"_aws"' in line]


def emf_totals(server: Container, skip: int = 0) -> dict[str, float]:
    """The cache's figures summed over the EMF lines after the first ``skip`` (one a second
    with ``EMF_EVERY_S``, written when steps run: two short requests a second apart flush
    what the requests before them counted)."""
    for _ in range(2):
        time.sleep(1.2)
        answer(server.invoke(ask(NUDGE, 2)))
    totals: dict[str, float] = {}
    for document in emf_documents(server)[skip:]:
        for metric in document["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
            name = metric["Name"]
            totals[name] = totals.get(name, 0.0) + document[name]
    return totals


def test_the_seed_cpu_config_serves_a_2k_prompt_from_the_cache(containers, model_dir):
    spec = ContainerSpec(with_config(model_dir, "lmcache_config_cpu.yaml"),
                         env={**SEED_ENV, **NO_VLLM_PREFIX_CACHE, **EVERY_HIT})
    began = time.perf_counter()
    server = containers(spec)
    ready = server.wait_ready()
    print(f"\ndocker run -> /ping 200: {time.perf_counter() - began:.1f} s "
          f"(polled {ready:.1f} s)")
    prompt = text_prompt(2048, 0)
    first_tokens, first_cached = answer(server.invoke(ask(prompt)))
    assert first_cached == 0
    tokens, cached = answer(server.invoke(ask(prompt)))
    assert cached >= FULL_CHUNKS_2K, server.log_tail()
    assert tokens == first_tokens  # greedy: the cache changes nothing
    ttft = {}
    for length, offset in ((2048, 2048), (4096, 4096)):  # TTFT: one new token
        cold = server.invoke(ask(text_prompt(length, offset), tokens=1))
        time.sleep(1)  # the saves' tier writes run after the answer: let the last chunk land
        warm = server.invoke(ask(text_prompt(length, offset), tokens=1))
        assert answer(warm)[0] == answer(cold)[0]
        ttft[length] = (cold, warm)
        print(f"TTFT at {length} tokens through the container: cold "
              f"{cold.seconds * 1000:.0f} ms, warm {warm.seconds * 1000:.0f} ms "
              f"({answer(warm)[1]} cached)")
    cold, warm = ttft[2048]
    assert answer(warm)[1] >= 1792
    assert warm.seconds <= cold.seconds / 5, (cold.seconds, warm.seconds)


BAD_CONFIGS = {
    "an unknown key": ("chunk_sise: 256\n", "chunk_sise"),
    "chunk_size 100": ("chunk_size: 100\n", "chunk_size"),
    "a disk budget without a path": ("max_local_disk_size: 5.0\n", "local_disk"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=list(BAD_CONFIGS))
def test_a_bad_config_stops_the_container_with_exit_2_naming_the_key(containers, model_dir,
                                                                     case):
    text, key = BAD_CONFIGS[case]
    (model_dir / "lmcache_config.yaml").write_text(text)
    server = containers(ContainerSpec(model_dir, env=SEED_ENV))
    code = server.wait_exit(10.0)
    assert code == 2, (code, server.log_tail())
    logs = server.logs()
    assert key in logs, logs
    assert "model loaded" not in logs


def test_the_seed_nvme_config_keeps_the_cache_across_stop_kill_and_start(containers, model_dir):
    """b and f: the disk tier on a Docker volume. `docker stop` (SIGTERM) ends the container
    within its grace period and what it stored is read back after `docker start`; a SIGKILL
    while it saves leaves chunks that are counted as corrupt misses, never served: every
    answer after the restart is the one before it."""
    volume = containers.volume()
    spec = ContainerSpec(with_config(model_dir, "lmcache_config_nvme.yaml"),
                         env={**SEED_ENV, **NO_VLLM_PREFIX_CACHE, **EMF_EVERY_S, **EVERY_HIT},
                         args=("-v", f"{volume}:/tmp/cache"))
    server = containers(spec)
    server.wait_ready()
    prompt = text_prompt(2048, 8192)
    tokens, cached = answer(server.invoke(ask(prompt)))
    assert cached == 0
    time.sleep(2)  # the disk tier's writes are asynchronous: let them land before the stop

    began = time.perf_counter()
    server.docker("stop")  # SIGTERM, then SIGKILL after the 10 s grace period
    stopped = time.perf_counter() - began
    state = server.state()
    print(f"\ndocker stop: exited {state['ExitCode']} in {stopped:.1f} s")
    assert state["ExitCode"] == 0 and stopped < 10.0, (state, server.log_tail())

    server.docker("start")
    server.wait_ready()
    again, cached = answer(server.invoke(ask(prompt)))
    assert cached >= FULL_CHUNKS_2K, server.log_tail()  # read from the disk
    assert again == tokens

    other = text_prompt(2048, 10240)
    other_tokens, _ = answer(server.invoke(ask(other)))
    server.docker("kill", "-s", "KILL")  # while the second prompt's chunks are being saved
    server.docker("start")
    server.wait_ready()
    before = len(emf_documents(server))
    for sent, expected in ((prompt, tokens), (other, other_tokens)):
        got, cached = answer(server.invoke(ask(sent)))
        print(f"after SIGKILL and start: {cached} cached tokens")
        assert got == expected, server.log_tail()
    figures = emf_totals(server, before)
    print(f"after SIGKILL and start: corrupt {figures.get('Corrupt.disk', 0):.0f}, "
          f"forged {figures.get('Forged.disk', 0):.0f}, loaded from disk "
          f"{figures.get('LoadedTokens.disk', 0):.0f} tokens, failed loads "
          f"{figures.get('FailedLoads', 0):.0f}")
    assert figures.get("LoadedTokens.disk", 0) >= FULL_CHUNKS_2K  # the first prompt, from disk


KV_KEY_ENV = "KV_CHUNK_KEY"  # not LMCACHE_*: those are config keys


def keyed(model_dir, redis: RedisServer, secret: str) -> ContainerSpec:
    """The seed's CPU config and env vars, a shared Redis tier keyed with ``secret``
    (``remote_auth_key_env``), stateful sessions as `sagemaker_tests.deploy` sets them."""
    return ContainerSpec(with_config(model_dir, "lmcache_config_cpu.yaml"), env={
        **SEED_ENV, **SESSIONS_DEFAULTS, **NO_VLLM_PREFIX_CACHE, **EMF_EVERY_S, **EVERY_HIT,
        "OPTION_LMCACHE_REMOTE_URL": redis.url,
        "OPTION_LMCACHE_REMOTE_AUTH_KEY_ENV": KV_KEY_ENV, KV_KEY_ENV: secret})


@pytest.fixture(scope="module")
def shared_pair(image, tmp_path_factory) -> Iterator[tuple[Containers, RedisServer, list]]:
    """One redis-server on loopback and two containers keyed alike in front of it (c)."""
    folder = tmp_path_factory.mktemp("shared")
    pool = Containers(image, folder)
    redis = RedisServer(folder / "redis").start()
    try:
        spec = keyed(make_model_dir(folder), redis, "a" * 64)
        pair = [pool.start(spec), pool.start(spec)]  # both load at once
        for server in pair:
            server.wait_ready()
        yield pool, redis, pair
    finally:
        pool.close()
        redis.stop()


def test_two_containers_share_a_keyed_redis_and_another_key_gets_no_hits(shared_pair, tmp_path):
    """c: a prompt answered by the first container is a hit from Redis in the second; a third
    container with another key finds the values forged: counted, never loaded, same answer."""
    pool, redis, (first, second) = shared_pair
    prompt = text_prompt(2048, 12288)
    tokens, cached = answer(first.invoke(ask(prompt)))
    assert cached == 0
    assert redis.wait_for_values(2048 // CHUNK, within_s=30) >= 2048 // CHUNK
    got, cached = answer(second.invoke(ask(prompt)))
    assert cached >= FULL_CHUNKS_2K, second.log_tail()
    assert got == tokens
    assert emf_totals(second).get("LoadedTokens.remote", 0) >= FULL_CHUNKS_2K

    other = Container(pool.image, keyed(make_model_dir(tmp_path), redis, "b" * 64), tmp_path)
    other.run()
    try:
        other.wait_ready()
        got, cached = answer(other.invoke(ask(prompt)))
        figures = emf_totals(other)
        print(f"\nanother key: {cached} cached tokens, forged {figures.get('Forged.remote', 0):.0f}"
              f", loaded from Redis {figures.get('LoadedTokens.remote', 0):.0f} tokens")
        assert got == tokens
        assert cached == 0, other.log_tail()
        assert figures.get("Forged.remote", 0) >= 1, figures
        assert figures.get("LoadedTokens.remote", 0) == 0, figures
    finally:
        other.remove()


ENDPOINT = "lmcache-ext-image-e"
SUITE = ("sagemaker_tests/test_endpoint.py", "sagemaker_tests/test_sessions.py",
         "sagemaker_tests/test_warm.py")  # test_deploy.py drives a stubbed AWS, no endpoint
# The suite's cases for an LMI target on the stand-in: 21 run, 12 are skipped with the reason
# (streaming: 3; payloads LMI does not refuse: 6; the built-in server's context, logs, expiry).
MIN_PASSED = 21


def start_router(backends: list[Container], log_path) -> tuple[subprocess.Popen, str]:
    """``lmcache-ext route`` (the local SageMaker runtime) in front of ``backends``; its URL
    once /ping answers."""
    port = free_port()
    command = [sys.executable, "-m", "lmcache_ext.cli", "route", "--port", str(port),
               "--endpoint-name", ENDPOINT]
    for server in backends:
        command += ["--backend", f"http://127.0.0.1:{server.port}"]
    with open(log_path, "w") as log:
        router = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and router.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as reply:
                if reply.status == 200:
                    return router, url
        except OSError:
            time.sleep(0.2)
    router.kill()
    raise AssertionError(f"the router did not answer /ping:\n{log_path.read_text()}")


def test_the_sagemaker_suite_passes_against_two_containers_behind_the_local_runtime(
        shared_pair, tmp_path):
    """e: the SageMaker suite (sagemaker_tests, through boto3 and the SDK) against c's two
    containers (the seed's config and env vars, one keyed Redis, stateful sessions on) behind
    `lmcache-ext route`, SageMaker runtime's API on loopback; the suite's LMI target
    (``LOCAL_SAGEMAKER_RUNTIME_URL``: LMI's answers and statuses, no streaming on the stand-in)."""
    _, _, pair = shared_pair
    router, url = start_router(pair, tmp_path / "router.log")
    env = {k: v for k, v in os.environ.items() if k != ENDPOINT_ENV}
    env.update({RUNTIME_URL_ENV: url, RUNTIME_NAME_ENV: ENDPOINT})
    began = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p",
                               "no:cacheprovider", *SUITE], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
    finally:
        router.terminate()
        router.wait(timeout=30)
    said = done.stdout + done.stderr
    print(f"\nthe SageMaker suite against two containers behind the router: "
          f"{time.perf_counter() - began:.0f} s\n" + "\n".join(said.splitlines()[-25:]))
    assert done.returncode == 0, said[-6000:]
    passed = re.search(r"(\d+) passed", said)
    assert passed and int(passed.group(1)) >= MIN_PASSED, said[-3000:]


UNSUPPORTED_BASE = """FROM {stand_in}
RUN mkdir -p /opt/other-vllm/vllm \\
    && echo '__version__ = "0.10.1"' > /opt/other-vllm/vllm/__init__.py
ENV PYTHONPATH=/opt/other-vllm:/opt/djl/python
"""


def test_the_build_stops_on_a_base_whose_vllm_is_unsupported(image):
    """The Dockerfile's version gate: on a base whose vLLM reports 0.10.1 (the stand-in with
    another vllm package first on the path), `docker build` fails naming the version."""
    base = "lmcache-ext-test-base:vllm-0.10.1"
    made = subprocess.run(["docker", "build", "-q", "-t", base, "-"], capture_output=True,
                          text=True, input=UNSUPPORTED_BASE.format(stand_in=STAND_IN))
    assert made.returncode == 0, made.stderr
    try:
        done = subprocess.run(["docker", "build", "--network", "host", "--build-arg",
                               f"BASE_IMAGE={base}", "-t", "lmcache-ext-test:unsupported",
                               str(REPO)], capture_output=True, text=True)
        said = done.stdout + done.stderr
        assert done.returncode != 0, said[-3000:]
        assert "the base image's vLLM is 0.10.1" in said, said[-3000:]
    finally:
        subprocess.run(["docker", "image", "rm", "-f", base, "lmcache-ext-test:unsupported"],
                       capture_output=True)


# What our layer may add to LMI's image: the package, its handler file, the entrypoint and the
# example configs. The LMI stand-in (lmi_stand_in/, container/lmi_stand_in/) is the test base's.
FIND_STAND_IN = r"""
import importlib.util, pathlib, sys
import lmcache_ext
ours = pathlib.Path(lmcache_ext.__file__).parent
found = [str(p) for p in ours.rglob("*") if "djl_python" in p.parts or "lmi_stub" in p.parts]
found += [str(p) for p in pathlib.Path("/opt/lmcache-ext").rglob("*")
          if "lmi_stand_in" in p.parts]
print("\n".join(found))
sys.exit(1 if found else 0)
"""


def test_the_image_carries_no_lmi_stand_in_of_ours(image):
    """The stand-in of LMI's djl_python is the test base's: neither the installed package nor
    /opt/lmcache-ext holds one (LMI's own djl_python is the only one in a real image)."""
    done = subprocess.run(["docker", "run", "--rm", "--network", "host", "--entrypoint",
                           "python3", image, "-c", FIND_STAND_IN],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
