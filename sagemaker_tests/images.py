"""Which image the endpoint runs: ours (LMI + lmcache-ext, built from the Dockerfile and pushed
to the user's own ECR), or one named with ``--image-uri``.

The Dockerfile's ``BASE_IMAGE`` is the one fact: its tag (``0.36.0-lmi27.0.0-cu130``) gives the
DJL version that ``sagemaker.core.image_uris.retrieve("djl-lmi", ...)`` takes (the SDK's bundled
table, offline) to name the same LMI base in the endpoint's region, and our image's tag is that
tag plus ``-lmcache-ext-<package version>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import lmcache_ext

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"
BASE_ARG = re.compile(r"^ARG\s+BASE_IMAGE=(?P<uri>\S+)\s*$", re.MULTILINE)
LMI_FRAMEWORK = "djl-lmi"  # sagemaker-core's image_uri_config/djl-lmi.json
DEFAULT_REPOSITORY = "lmcache-ext-lmi"
ACCOUNT_PLACEHOLDER = "<account>"


class ImageError(ValueError):
    """The image cannot be named; the text says why."""


@dataclass(frozen=True)
class ImagePlan:
    uri: str  # what the model runs
    base: str | None  # the LMI base in the region (None: --image-uri was given)
    build: tuple[str, ...]  # the commands that build and push ``uri`` (empty for --image-uri)


def base_tag(dockerfile: Path = DOCKERFILE) -> str:
    """The tag of the Dockerfile's default ``BASE_IMAGE`` (e.g. ``0.36.0-lmi27.0.0-cu130``)."""
    match = BASE_ARG.search(dockerfile.read_text(encoding="utf-8"))
    if match is None or ":" not in match["uri"].rsplit("/", 1)[-1]:
        raise ImageError(f"{dockerfile}: no 'ARG BASE_IMAGE=<repository>:<tag>' line")
    return match["uri"].rsplit(":", 1)[1]


def ecr_domain(region: str) -> str:
    return "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"


def lmi_base_uri(region: str, tag: str) -> str:
    """LMI's image with ``tag`` in ``region``, from the SDK's table (no network)."""
    from sagemaker.core import image_uris  # the SDK takes ~2 s to import: only when needed

    djl_version = tag.split("-", 1)[0]
    try:
        uri = image_uris.retrieve(LMI_FRAMEWORK, region=region, version=djl_version)
    except ValueError as error:
        raise ImageError(f"sagemaker-core has no {LMI_FRAMEWORK} {djl_version} image for region "
                         f"{region}: {error}") from error
    if not uri.endswith(f":{tag}"):
        raise ImageError(f"sagemaker-core names {uri} for {LMI_FRAMEWORK} {djl_version}, not the "
                         f"Dockerfile's base tag {tag}: pass --image-uri")
    return uri


def our_image_uri(account: str, region: str, repository: str, tag: str) -> str:
    registry = f"{account}.dkr.ecr.{region}.{ecr_domain(region)}"
    return f"{registry}/{repository}:{tag}-lmcache-ext-{lmcache_ext.__version__}"


def build_commands(base: str, ours: str, region: str, repository: str) -> tuple[str, ...]:
    login = f"aws ecr get-login-password --region {region} | docker login --username AWS " \
            f"--password-stdin"
    return (f"{login} {base.split('/', 1)[0]}",
            f"docker build --build-arg BASE_IMAGE={base} -t {ours} .",
            f"aws ecr create-repository --region {region} --repository-name {repository}"
            f"   # once",
            f"{login} {ours.split('/', 1)[0]}",
            f"docker push {ours}")


def plan_image(region: str, image_uri: str | None, account: str | None,
               repository: str = DEFAULT_REPOSITORY) -> ImagePlan:
    """``--image-uri`` as given, else ours in ``account``'s ECR (None: the placeholder)."""
    if image_uri:
        return ImagePlan(image_uri, None, ())
    tag = base_tag()
    base = lmi_base_uri(region, tag)
    ours = our_image_uri(account or ACCOUNT_PLACEHOLDER, region, repository, tag)
    return ImagePlan(ours, base, build_commands(base, ours, region, repository))
