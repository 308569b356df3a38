"""SageMaker's control plane through the SageMaker Python SDK v3 resources (sagemaker-core):
create the model, endpoint config and endpoint of a plan and wait for InService; delete them.

Every call goes through the client sagemaker-core caches for ``(session, region)``
(``SageMakerClient(session=..., region_name=...)``), so a test can attach botocore's ``Stubber``
to exactly that client. sagemaker-core describes each resource after creating it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from sagemaker_tests.deployment import VARIANT, DeployPlan, Names

DEFAULT_WAIT_S = 3600
POLL_S = 30
GONE_STATUSES = ("Deleting",)


class ControlError(RuntimeError):
    """A control-plane call failed or the endpoint did not come up; the text says which."""


@dataclass(frozen=True)
class Deleted:
    kind: str  # "endpoint", "endpoint config", "model"
    name: str
    outcome: str  # "deleted", "not found", "already deleting", or "failed: <Code>: <message>"

    @property
    def failed(self) -> bool:
        return self.outcome.startswith("failed")


def sagemaker_client(session: boto3.Session, region: str):
    """The client the resources use for ``session`` in ``region`` (sagemaker-core's cache)."""
    from sagemaker.core.utils.utils import SageMakerClient

    return SageMakerClient(session=session, region_name=region).get_client("sagemaker")


def account_id(session: boto3.Session, region: str) -> str:
    try:
        return session.client("sts", region_name=region).get_caller_identity()["Account"]
    except (ClientError, BotoCoreError) as error:
        raise ControlError(f"STS GetCallerIdentity (for the account's ECR): {error}") from error


def _error_text(error: ClientError) -> str:
    info = error.response.get("Error", {})
    return f"{info.get('Code', 'error')}: {info.get('Message', error)}"


def _aws_error(what: str, error: ClientError) -> ControlError:
    return ControlError(f"{what}: {_error_text(error)}")


def _container(plan: DeployPlan):
    from sagemaker.core.shapes import ContainerDefinition, ModelDataSource, S3ModelDataSource

    url = plan.model_data_url
    data = {}
    if url and url.endswith("/"):  # an uncompressed prefix: files land in /opt/ml/model as-is
        source = S3ModelDataSource(s3_uri=url, s3_data_type="S3Prefix", compression_type="None")
        data = {"model_data_source": ModelDataSource(s3_data_source=source)}
    elif url:  # a model.tar.gz, unpacked into /opt/ml/model
        data = {"model_data_url": url}
    return ContainerDefinition(image=plan.image.uri, environment=dict(plan.environment), **data)


def _routing_config(plan: DeployPlan) -> dict:
    """The variant's ``routing_config`` argument (none: SageMaker's default strategy)."""
    from sagemaker.core.shapes import PrefixAwareRoutingConfig, ProductionVariantRoutingConfig

    if plan.routing is None:
        return {}
    settings = plan.routing.prefix_aware
    prefix = {} if settings is None else {"prefix_aware_routing_config": PrefixAwareRoutingConfig(
        prefix_length=settings.prefix_length,
        concurrency_threshold=settings.concurrency_threshold)}
    return {"routing_config": ProductionVariantRoutingConfig(
        routing_strategy=plan.routing.strategy, **prefix)}


def create(plan: DeployPlan, session: boto3.Session, say: Callable[[str], None] = print):
    """CreateModel, CreateEndpointConfig, CreateEndpoint; returns the Endpoint resource."""
    from sagemaker.core.resources import Endpoint, EndpointConfig, Model
    from sagemaker.core.shapes import ProductionVariant

    names, region = plan.names, plan.region
    step = f"CreateModel {names.model}"
    try:
        Model.create(model_name=names.model, execution_role_arn=plan.role_arn,
                     primary_container=_container(plan), session=session, region=region)
        say(f"created model {names.model}")
        step = f"CreateEndpointConfig {names.endpoint_config}"
        variant = ProductionVariant(
            variant_name=VARIANT, model_name=names.model, instance_type=plan.instance_type,
            initial_instance_count=plan.instance_count,
            container_startup_health_check_timeout_in_seconds=plan.health_check_timeout_s,
            **_routing_config(plan))
        EndpointConfig.create(endpoint_config_name=names.endpoint_config,
                              production_variants=[variant], session=session, region=region)
        say(f"created endpoint config {names.endpoint_config}")
        step = f"CreateEndpoint {names.endpoint}"
        endpoint = Endpoint.create(endpoint_name=names.endpoint,
                                   endpoint_config_name=names.endpoint_config,
                                   session=session, region=region)
        say(f"created endpoint {names.endpoint} ({endpoint.endpoint_status})")
        return endpoint
    except ClientError as error:
        hint = ""
        if "already exist" in str(error):
            hint = f" (python -m sagemaker_tests.teardown --name {names.endpoint} deletes it)"
        raise ControlError(f"{_aws_error(step, error)}{hint}") from error
    except BotoCoreError as error:
        raise ControlError(f"{step}: {error}") from error


def wait_in_service(endpoint, timeout_s: int = DEFAULT_WAIT_S, poll_s: int = POLL_S) -> None:
    """Poll DescribeEndpoint until InService; a Failed endpoint or the timeout is an error."""
    from sagemaker.core.utils.exceptions import FailedStatusError, TimeoutExceededError

    name = endpoint.endpoint_name
    try:
        endpoint.wait_for_status("InService", poll=poll_s, timeout=timeout_s)
    except FailedStatusError as error:
        raise ControlError(
            f"endpoint {name} is {endpoint.endpoint_status}: {endpoint.failure_reason} (logs: "
            f"CloudWatch /aws/sagemaker/Endpoints/{name}; python -m sagemaker_tests.teardown "
            f"--name {name} deletes it)") from error
    except TimeoutExceededError as error:
        raise ControlError(f"endpoint {name} still {endpoint.endpoint_status} after "
                           f"{timeout_s} s: wait longer with --timeout, or check CloudWatch "
                           f"/aws/sagemaker/Endpoints/{name}") from error
    except ClientError as error:
        raise _aws_error(f"DescribeEndpoint {name}", error) from error
    except BotoCoreError as error:
        raise ControlError(f"DescribeEndpoint {name}: {error}") from error


def _not_found(error: ClientError) -> bool:
    """SageMaker answers a Describe/Delete of a missing name with ValidationException "Could
    not find ..."."""
    info = error.response.get("Error", {})
    return info.get("Code") == "ResourceNotFound" or \
        info.get("Code") in ("ValidationException", "ValidationError") and \
        "could not find" in info.get("Message", "").lower()


def teardown(names: Names, region: str, session: boto3.Session) -> list[Deleted]:
    """Delete the endpoint, its config and the model, each tried whatever the others did; one
    already gone is not an error, a refusal is a ``failed`` outcome."""
    from sagemaker.core.resources import Endpoint, EndpointConfig, Model

    steps = (("endpoint", names.endpoint,
              lambda: Endpoint.get(endpoint_name=names.endpoint, session=session, region=region)),
             ("endpoint config", names.endpoint_config,
              lambda: EndpointConfig.get(endpoint_config_name=names.endpoint_config,
                                         session=session, region=region)),
             ("model", names.model,
              lambda: Model.get(model_name=names.model, session=session, region=region)))
    done: list[Deleted] = []
    for kind, name, get in steps:
        try:
            resource = get()
            if getattr(resource, "endpoint_status", None) in GONE_STATUSES:
                done.append(Deleted(kind, name, "already deleting"))
                continue
            resource.delete()
            done.append(Deleted(kind, name, "deleted"))
        except ClientError as error:
            if _not_found(error):
                done.append(Deleted(kind, name, "not found"))
            else:
                done.append(Deleted(kind, name, f"failed: {_error_text(error)}"))
        except BotoCoreError as error:
            done.append(Deleted(kind, name, f"failed: {error}"))
    return done
