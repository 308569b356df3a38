"""What ``python -m sagemaker_tests.deploy`` creates and ``teardown`` deletes: the names, the
plan (image, role, instance, environment, model artifacts, routing strategy) and its printed form.

The environment is, lowest precedence first: LMI's vLLM async service with stateful sessions on
(``SESSIONS_ENV``; our entrypoint then runs lmcache-ext's LMI handler so sessions pin their
conversation), the ``--env-file`` (the seed's ``OPTION_LMCACHE_CONFIG_FILE`` and
``OPTION_KV_TRANSFER_CONFIG``), then ``--model-id`` as ``OPTION_MODEL_ID``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from lmcache_ext.adapters.lmi.facts import SESSIONS_ON
from lmcache_ext.container.entrypoint import CONFIG_FILE_ENV, KV_ENV
from lmcache_ext.container.lmi_sessions import SESSIONS_ENV
from lmcache_ext.container.routes import SEED_KV_TRANSFER_CONFIG
from lmcache_ext.routing.policy import SAGEMAKER_STRATEGIES, PrefixAware
from lmcache_ext.routing.router import VARIANT_NAME as VARIANT
from sagemaker_tests.envfile import masked
from sagemaker_tests.images import ImagePlan

DEFAULT_NAME = "lmcache-ext-test"
DEFAULT_INSTANCE = "ml.g6e.xlarge"
HEALTH_CHECK_TIMEOUT_S = 1800  # model download + vLLM load + CUDA graphs on a cold instance
MODEL_DIR = "/opt/ml/model/"  # where SageMaker unpacks the model artifacts
MODEL_ID_ENV = "OPTION_MODEL_ID"
SESSIONS_DEFAULTS = {"OPTION_ASYNC_MODE": "true", "OPTION_ROLLING_BATCH": "disable",
                     SESSIONS_ENV: SESSIONS_ON}
# SageMaker's name pattern; the longest suffix below must still fit its 63 characters.
NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,55}")
MISSING_ROLE = "<--role-arn required>"


class PlanError(ValueError):
    """The arguments cannot make a working endpoint; the text says what to change."""


@dataclass(frozen=True)
class Names:
    endpoint: str
    endpoint_config: str
    model: str

    @classmethod
    def of(cls, name: str) -> Names:
        if not NAME.fullmatch(name):
            raise PlanError(f"--name {name!r}: letters, digits and '-' (not first), at most 56 "
                            f"characters (SageMaker's names, with '-config' added)")
        return cls(endpoint=name, endpoint_config=f"{name}-config", model=f"{name}-model")


@dataclass(frozen=True)
class RoutingPlan:
    """The production variant's ``RoutingConfig``: SageMaker's strategy name and, for
    ``PREFIX_AWARE``, its two settings (checked against SageMaker's ranges)."""

    strategy: str  # a key of SAGEMAKER_STRATEGIES
    prefix_aware: PrefixAware | None = None

    def describe(self) -> str:
        if self.prefix_aware is None:
            return self.strategy
        return (f"{self.strategy} (PrefixLength {self.prefix_aware.prefix_length} B, "
                f"ConcurrencyThreshold {self.prefix_aware.concurrency_threshold})")


def routing_plan(strategy: str | None, prefix_length: int | None = None,
                 concurrency_threshold: int | None = None) -> RoutingPlan | None:
    """The routing of ``--routing-strategy`` and PREFIX_AWARE's settings; None leaves SageMaker's
    default. Raises PlanError naming the flag for an unknown strategy, a setting out of
    SageMaker's range, a missing PREFIX_AWARE setting, or a setting without PREFIX_AWARE."""
    given = {"--prefix-length": prefix_length, "--concurrency-threshold": concurrency_threshold}
    if strategy is None:
        if any(v is not None for v in given.values()):
            raise PlanError(f"{' and '.join(k for k, v in given.items() if v is not None)}: "
                            f"only with --routing-strategy PREFIX_AWARE")
        return None
    name = strategy.upper()
    if name not in SAGEMAKER_STRATEGIES:
        raise PlanError(f"--routing-strategy {strategy}: expected one of "
                        f"{', '.join(SAGEMAKER_STRATEGIES)} (KV_AWARE needs a container that "
                        f"reports its KV cache to SageMaker, which ours does not)")
    if name != "PREFIX_AWARE":
        if any(v is not None for v in given.values()):
            raise PlanError(f"--routing-strategy {name} takes no --prefix-length or "
                            f"--concurrency-threshold (PREFIX_AWARE's settings)")
        return RoutingPlan(name)
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise PlanError(f"--routing-strategy PREFIX_AWARE needs {' and '.join(missing)} "
                        f"(SageMaker requires both; `lmcache-ext advise ... "
                        f"--shared-prefix-tokens N` suggests a prefix length)")
    try:
        settings = PrefixAware(prefix_length, concurrency_threshold)
        settings.check_sagemaker()
    except ValueError as error:
        raise PlanError(f"--routing-strategy PREFIX_AWARE: {error}") from error
    return RoutingPlan(name, settings)


@dataclass(frozen=True)
class DeployPlan:
    names: Names
    region: str
    image: ImagePlan
    role_arn: str | None
    instance_type: str
    instance_count: int
    environment: Mapping[str, str] = field(default_factory=dict)
    model_data_url: str | None = None  # s3://.../model.tar.gz, or an s3://.../ prefix
    health_check_timeout_s: int = HEALTH_CHECK_TIMEOUT_S
    routing: RoutingPlan | None = None  # None: SageMaker's default strategy


def environment(env_file: Mapping[str, str], model_id: str | None) -> dict[str, str]:
    env = {**SESSIONS_DEFAULTS, **env_file}
    if model_id:
        env[MODEL_ID_ENV] = model_id
    return env


def check(plan: DeployPlan) -> None:
    """Raise PlanError for an endpoint that would not start (found now, not after 20 min)."""
    env = plan.environment
    has_model = plan.model_data_url or any(env.get(k) for k in (MODEL_ID_ENV, "HF_MODEL_ID"))
    if not has_model:
        raise PlanError(f"no model: pass --model-id (or set {MODEL_ID_ENV} in the env file) or "
                        f"--model-data-url")
    config_file = env.get(CONFIG_FILE_ENV, "")
    if config_file.startswith(MODEL_DIR) and not plan.model_data_url:
        raise PlanError(f"{CONFIG_FILE_ENV}={config_file} is read from the model artifacts: "
                        f"pass --model-data-url s3://... holding that file, or drop it and set "
                        f"the cache with OPTION_LMCACHE_* keys (e.g. "
                        f"OPTION_LMCACHE_MAX_LOCAL_CPU_SIZE)")
    if plan.model_data_url and not plan.model_data_url.startswith("s3://"):
        raise PlanError(f"--model-data-url {plan.model_data_url}: an s3:// URL")
    if plan.instance_count < 1:
        raise PlanError(f"--instance-count {plan.instance_count}: at least 1")
    if KV_ENV not in env and not any(k.startswith("OPTION_LMCACHE_") for k in env):
        raise PlanError(f"the cache is off: set {KV_ENV}={SEED_KV_TRANSFER_CONFIG} (see "
                        f"sagemaker_tests/seed.env) or OPTION_LMCACHE_* keys")


def describe(plan: DeployPlan) -> str:
    """The plan as printed (secret-looking values masked)."""
    names = plan.names
    routing = plan.routing.describe() if plan.routing else "(SageMaker's default)"
    lines = [f"region:          {plan.region}",
             f"model:           {names.model}",
             f"endpoint config: {names.endpoint_config} (variant {VARIANT}: "
             f"{plan.instance_count} x {plan.instance_type}, container start health check "
             f"{plan.health_check_timeout_s} s)",
             f"routing:         {routing}",
             f"endpoint:        {names.endpoint}",
             f"image:           {plan.image.uri}",
             f"execution role:  {plan.role_arn or MISSING_ROLE}",
             f"model artifacts: {plan.model_data_url or '(none)'}",
             "environment:"]
    lines += [f"  {key}={value}" for key, value in sorted(masked(plan.environment).items())]
    if plan.image.base:
        lines += [f"LMI base image:  {plan.image.base}",
                  "build and push our image first (from the repository root):"]
        lines += [f"  {command}" for command in plan.image.build]
    return "\n".join(lines)


def describe_teardown(names: Names, region: str) -> str:
    return "\n".join([f"region:          {region}",
                      f"endpoint:        {names.endpoint}",
                      f"endpoint config: {names.endpoint_config}",
                      f"model:           {names.model}"])
