"""What LMI's Python side (djl_python, djl-serving 0.36, read in its source) does that our
handler and our container entrypoint must match. Imports nothing: facts and pure functions.

- LMI's vLLM service is the module ``djl_python.lmi_vllm.vllm_async_service``; DJL loads an
  ``option.entryPoint`` that is an absolute path as a file (``SourceFileLoader``), any other as a
  module. Our handler wraps that service (``handlers/lmcache_ext_vllm.py``).
- The service creates its session manager only when the property ``enable_stateful_sessions`` is
  exactly the string ``"true"`` (its default): ``True``, ``TRUE`` or ``1`` turn sessions off
  without a word (and, in 0.36, every request then fails on the missing manager).
- Sessions expire ``sessions_expiration`` seconds (default 1200) after their creation.
- Its ``SessionManager`` builds ``boto3.client("cloudwatch")`` (``djl_python/aws/cloud_watch.py``)
  when boto3 is installed; boto3 finds the region in ``AWS_DEFAULT_REGION`` or its config files
  (not ``AWS_REGION``), and without one raises: the service, and so the model, fails to load.
  LMI's posts to that client are best effort (errors are logged at debug level).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

LMI_VLLM_SERVICE = "djl_python.lmi_vllm.vllm_async_service"
SESSIONS_OPTION = "enable_stateful_sessions"  # option.<name> / OPTION_<NAME> / property name
SESSIONS_ON = "true"  # the one value LMI's Python side reads as on (and its default)
SESSIONS_EXPIRATION_OPTION = "sessions_expiration"
TRUE_SPELLINGS = ("true",)  # compared lower-cased and stripped: what users mean by on
REGION_ENV = "AWS_DEFAULT_REGION"  # what boto3 reads
SAGEMAKER_REGION_ENV = "AWS_REGION"  # what SageMaker and Lambda set; boto3 does not read it
FALLBACK_REGION = "us-east-1"  # only so the client can be built: LMI's posts are best effort


@dataclass(frozen=True)
class SessionsFlag:
    """How LMI reads an ``enable_stateful_sessions`` value, and what to pass it instead."""

    value: str | None  # as the user set it (None: not set)
    lmi_reads_on: bool  # what LMI's Python side makes of it
    meant_on: bool  # what the user meant (any case of "true")
    normalised: str | None  # the value to pass on ("true" where the user meant on)

    @property
    def pitfall(self) -> bool:
        """The user meant on but LMI reads off (e.g. ``True``)."""
        return self.meant_on and not self.lmi_reads_on


def read_sessions_flag(value: str | None) -> SessionsFlag:
    """LMI's reading of ``enable_stateful_sessions`` (unset: on)."""
    if value is None:
        return SessionsFlag(None, True, True, None)
    meant_on = value.strip().lower() in TRUE_SPELLINGS
    return SessionsFlag(value, value == SESSIONS_ON, meant_on,
                        SESSIONS_ON if meant_on else value)


@dataclass(frozen=True)
class RegionFix:
    """The env var to set so LMI's CloudWatch client can be built, and why."""

    name: str
    value: str
    reason: str


def region_for_lmi(env: Mapping[str, str], configured: str | None) -> RegionFix | None:
    """What to set before LMI's service loads: nothing where boto3 finds a region (``env``'s
    ``AWS_DEFAULT_REGION``, or ``configured``: its config files'), else ``AWS_REGION``'s value,
    else ``FALLBACK_REGION``."""
    if env.get(REGION_ENV) or configured:
        return None
    if env.get(SAGEMAKER_REGION_ENV):
        return RegionFix(REGION_ENV, env[SAGEMAKER_REGION_ENV],
                         f"{REGION_ENV} set from {SAGEMAKER_REGION_ENV} for LMI's session "
                         "manager (its boto3 CloudWatch client needs a region)")
    return RegionFix(REGION_ENV, FALLBACK_REGION,
                     f"no AWS region set: {REGION_ENV}={FALLBACK_REGION} so LMI's session "
                     "manager can build its boto3 CloudWatch client (without one the model "
                     f"does not load); set {REGION_ENV} to choose where LMI posts its metrics")
