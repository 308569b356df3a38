"""``python -m sagemaker_tests.deploy`` and ``.teardown`` without an AWS account.

SageMaker's control plane cannot run here, so its requests are checked with botocore's
``Stubber`` on the very client sagemaker-core uses (its cache, keyed by session and region):
the exact CreateModel / CreateEndpointConfig / CreateEndpoint parameters, with botocore's
parameter validation on (the Stubber validates requests and responses against the service
model). Everything else runs for real: the env file, the SDK's image table, the CLIs, and the
commands as subprocesses with no credentials. None of these tests uses the ``endpoint`` fixture.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from sagemaker_tests import deploy, teardown
from sagemaker_tests.control import ControlError, create, sagemaker_client, wait_in_service
from sagemaker_tests.deployment import (
    HEALTH_CHECK_TIMEOUT_S,
    DeployPlan,
    Names,
    PlanError,
    check,
    environment,
    routing_plan,
)
from sagemaker_tests.envfile import EnvFileError, masked, parse_env, read_env_file
from sagemaker_tests.images import base_tag, plan_image

SEED_KV = '{"kv_connector":"LMCacheConnectorV1", "kv_role":"kv_both"}'  # the seed's exact text

REPO = Path(__file__).resolve().parents[1]
SEED_ENV = REPO / "sagemaker_tests" / "seed.env"
REGION = "us-east-1"
ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/SageMakerExecution"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/lmcache-ext-lmi:custom"
MODEL_ID = "Qwen/Qwen3-8B"
DATA = "s3://my-bucket/lmcache/"
NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
NAME = "lmcache-ext-test"
NAMES = Names.of(NAME)
EXPECTED_ENV = {"OPTION_ASYNC_MODE": "true", "OPTION_ROLLING_BATCH": "disable",
                "OPTION_ENABLE_STATEFUL_SESSIONS": "true",
                "OPTION_LMCACHE_CONFIG_FILE": "/opt/ml/model/lmcache_config.yaml",
                "OPTION_KV_TRANSFER_CONFIG": SEED_KV, "OPTION_MODEL_ID": MODEL_ID}
DEPLOY_ARGS = ["--model-id", MODEL_ID, "--env-file", str(SEED_ENV), "--model-data-url", DATA,
               "--region", REGION]


@pytest.fixture
def aws():
    """A session with made-up keys and a Stubber on sagemaker-core's client for it: every
    call must be one the test expects (Stubber raises on any other)."""
    session = boto3.Session(aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
                            aws_secret_access_key="not-a-secret", region_name=REGION)
    with Stubber(sagemaker_client(session, REGION)) as stubber:
        yield session, stubber
        stubber.assert_no_pending_responses()


def expect_describe_endpoint(stubber: Stubber, status: str, reason: str | None = None) -> None:
    reply = {"EndpointName": NAME, "EndpointArn": f"{ARN}:endpoint/{NAME}",
             "EndpointConfigName": NAMES.endpoint_config, "EndpointStatus": status,
             "CreationTime": NOW, "LastModifiedTime": NOW}
    if reason:
        reply["FailureReason"] = reason
    stubber.add_response("describe_endpoint", reply, {"EndpointName": NAME})


def expect_creates(stubber: Stubber, image: str = IMAGE, data: str = DATA,
                   routing: dict | None = None) -> None:
    """The three creates with their exact parameters (and the describes sagemaker-core sends
    after each), up to the endpoint's first status, Creating. ``routing``: the variant's
    expected ``RoutingConfig`` (none sent without it)."""
    container = {"Image": image, "Environment": EXPECTED_ENV}
    if data.endswith(".tar.gz"):
        container["ModelDataUrl"] = data
    else:  # a prefix: copied as is (uncompressed)
        container["ModelDataSource"] = {"S3DataSource": {
            "S3Uri": data, "S3DataType": "S3Prefix", "CompressionType": "None"}}
    stubber.add_response("create_model", {"ModelArn": f"{ARN}:model/{NAMES.model}"},
                         {"ModelName": NAMES.model, "PrimaryContainer": container,
                          "ExecutionRoleArn": ROLE})
    stubber.add_response("describe_model", {
        "ModelName": NAMES.model, "PrimaryContainer": container, "ExecutionRoleArn": ROLE,
        "CreationTime": NOW, "ModelArn": f"{ARN}:model/{NAMES.model}"},
        {"ModelName": NAMES.model})
    variant = {"VariantName": "AllTraffic", "ModelName": NAMES.model,
               "InstanceType": "ml.g6e.xlarge", "InitialInstanceCount": 1,
               "ContainerStartupHealthCheckTimeoutInSeconds": HEALTH_CHECK_TIMEOUT_S}
    if routing is not None:
        variant["RoutingConfig"] = routing
    stubber.add_response(
        "create_endpoint_config",
        {"EndpointConfigArn": f"{ARN}:endpoint-config/{NAMES.endpoint_config}"},
        {"EndpointConfigName": NAMES.endpoint_config, "ProductionVariants": [variant]})
    stubber.add_response("describe_endpoint_config", {
        "EndpointConfigName": NAMES.endpoint_config, "ProductionVariants": [variant],
        "EndpointConfigArn": f"{ARN}:endpoint-config/{NAMES.endpoint_config}",
        "CreationTime": NOW}, {"EndpointConfigName": NAMES.endpoint_config})
    stubber.add_response("create_endpoint", {"EndpointArn": f"{ARN}:endpoint/{NAME}"},
                         {"EndpointName": NAME, "EndpointConfigName": NAMES.endpoint_config})
    expect_describe_endpoint(stubber, "Creating")


def seed_plan(image_uri: str | None = IMAGE) -> DeployPlan:
    return DeployPlan(names=NAMES, region=REGION, image=plan_image(REGION, image_uri, ACCOUNT),
                      role_arn=ROLE, instance_type="ml.g6e.xlarge", instance_count=1,
                      environment=environment(read_env_file(SEED_ENV), MODEL_ID),
                      model_data_url=DATA)


def test_create_sends_the_exact_requests(aws):
    session, stubber = aws
    expect_creates(stubber)
    endpoint = create(seed_plan(), session, say=lambda _: None)
    assert endpoint.endpoint_status == "Creating"


def test_derived_image_reaches_create_model(aws):
    session, stubber = aws
    plan = seed_plan(image_uri=None)
    assert plan.image.uri == (f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/lmcache-ext-lmi:"
                              f"0.36.0-lmi27.0.0-cu130-lmcache-ext-0.1.0")
    expect_creates(stubber, image=plan.image.uri)
    create(plan, session, say=lambda _: None)


def test_deploy_main_waits_creating_to_in_service(aws, capsys):
    session, stubber = aws
    expect_creates(stubber)
    expect_describe_endpoint(stubber, "Creating")  # the wait's polls
    expect_describe_endpoint(stubber, "InService")
    code = deploy.main([*DEPLOY_ARGS, "--image-uri", IMAGE, "--role-arn", ROLE, "--poll", "0"],
                       session=session)
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{NAME} is InService" in out


def test_failed_endpoint_names_the_failure_reason(aws):
    session, stubber = aws
    expect_creates(stubber)
    reason = "The primary container for production variant AllTraffic did not pass the ping " \
             "health check."
    expect_describe_endpoint(stubber, "Failed", reason)
    endpoint = create(seed_plan(), session, say=lambda _: None)
    with pytest.raises(ControlError, match="is Failed: The primary container .* ping health"):
        wait_in_service(endpoint, timeout_s=60, poll_s=0)


def test_timeout_says_so(aws):
    session, stubber = aws
    expect_creates(stubber)
    expect_describe_endpoint(stubber, "Creating")
    endpoint = create(seed_plan(), session, say=lambda _: None)
    with pytest.raises(ControlError, match="still Creating after 0 s"):
        wait_in_service(endpoint, timeout_s=0, poll_s=0)


def test_no_wait_and_a_tarball(aws, capsys):
    session, stubber = aws
    tarball = "s3://my-bucket/lmcache/model.tar.gz"
    expect_creates(stubber, data=tarball)
    args = [*DEPLOY_ARGS, "--model-data-url", tarball, "--image-uri", IMAGE, "--role-arn", ROLE]
    assert deploy.main([*args, "--no-wait"], session=session) == 0
    assert "created endpoint lmcache-ext-test (Creating)" in capsys.readouterr().out


def test_existing_model_is_a_clear_error(aws, capsys):
    session, stubber = aws
    stubber.add_client_error("create_model", "ValidationException",
                             f'Cannot create already existing model "{ARN}:model/{NAMES.model}".')
    code = deploy.main([*DEPLOY_ARGS, "--image-uri", IMAGE, "--role-arn", ROLE], session=session)
    err = capsys.readouterr().err
    assert code == deploy.EXIT_FAILED
    assert "CreateModel lmcache-ext-test-model: ValidationException" in err
    assert "python -m sagemaker_tests.teardown --name lmcache-ext-test" in err


PREFIX_AWARE_ARGS = ["--routing-strategy", "PREFIX_AWARE", "--prefix-length", "1488",
                     "--concurrency-threshold", "8"]


def test_prefix_aware_routing_reaches_the_endpoint_config(aws, capsys):
    """Scenario: PREFIX_AWARE and its two settings become the variant's RoutingConfig, exactly
    as botocore's model spells it (the Stubber validates the request against it)."""
    session, stubber = aws
    expect_creates(stubber, routing={"RoutingStrategy": "PREFIX_AWARE",
                                     "PrefixAwareRoutingConfig": {"PrefixLength": 1488,
                                                                  "ConcurrencyThreshold": 8}})
    args = [*DEPLOY_ARGS, "--image-uri", IMAGE, "--role-arn", ROLE, "--no-wait"]
    assert deploy.main([*args, *PREFIX_AWARE_ARGS], session=session) == 0
    assert "routing:         PREFIX_AWARE (PrefixLength 1488 B, ConcurrencyThreshold 8)" in \
        capsys.readouterr().out


@pytest.mark.parametrize("strategy", ["LEAST_OUTSTANDING_REQUESTS", "random"])
def test_other_strategies_reach_the_endpoint_config(aws, strategy):
    session, stubber = aws
    expect_creates(stubber, routing={"RoutingStrategy": strategy.upper()})
    args = [*DEPLOY_ARGS, "--image-uri", IMAGE, "--role-arn", ROLE, "--no-wait"]
    assert deploy.main([*args, "--routing-strategy", strategy], session=session) == 0


@pytest.mark.parametrize("extra, needle", [
    (["--routing-strategy", "ROUND_ROBIN"], "--routing-strategy ROUND_ROBIN: expected one of "
                                            "RANDOM, LEAST_OUTSTANDING_REQUESTS, PREFIX_AWARE"),
    (["--routing-strategy", "KV_AWARE"], "KV_AWARE needs a container that reports"),
    (["--routing-strategy", "PREFIX_AWARE", "--prefix-length", "2048"],
     "PREFIX_AWARE needs --concurrency-threshold"),
    (["--routing-strategy", "PREFIX_AWARE"],
     "needs --prefix-length and --concurrency-threshold"),
    (["--routing-strategy", "PREFIX_AWARE", "--prefix-length", "512",
      "--concurrency-threshold", "8"], "PrefixLength 512: SageMaker takes 1024 to 65536"),
    (["--routing-strategy", "PREFIX_AWARE", "--prefix-length", "70000",
      "--concurrency-threshold", "8"], "PrefixLength 70000: SageMaker takes 1024 to 65536"),
    (["--routing-strategy", "PREFIX_AWARE", "--prefix-length", "2048",
      "--concurrency-threshold", "0"], "concurrency_threshold: 0 must be an integer >= 1"),
    (["--routing-strategy", "PREFIX_AWARE", "--prefix-length", "2048",
      "--concurrency-threshold", "1025"], "ConcurrencyThreshold 1025: SageMaker takes 1 to 1024"),
    (["--routing-strategy", "RANDOM", "--prefix-length", "2048"],
     "RANDOM takes no --prefix-length"),
    (["--concurrency-threshold", "8"],
     "--concurrency-threshold: only with --routing-strategy PREFIX_AWARE"),
])
def test_bad_routing_is_a_clear_error_before_any_aws_call(aws, capsys, extra, needle):
    """Scenario: a routing the endpoint config would refuse (or silently ignore) stops deploy
    with exit 2 naming the flag; the Stubber has no answer queued, so any call would fail."""
    session, _ = aws
    args = [*DEPLOY_ARGS, "--image-uri", IMAGE, "--role-arn", ROLE]
    assert deploy.main([*args, *extra], session=session) == deploy.EXIT_NOTHING_DONE
    assert needle in capsys.readouterr().err


def test_routing_plan_defaults_to_sagemakers():
    assert routing_plan(None) is None
    plan = routing_plan("prefix_aware", 65536, 1024)
    assert plan.strategy == "PREFIX_AWARE" and plan.prefix_aware.prefix_length == 65536
    with pytest.raises(PlanError, match="PrefixLength 1023"):
        routing_plan("PREFIX_AWARE", 1023, 1)


def test_role_is_required_to_deploy(aws, capsys):
    session, _ = aws
    assert deploy.main([*DEPLOY_ARGS, "--image-uri", IMAGE], session=session) == 2
    assert "--role-arn is required" in capsys.readouterr().err


def expect_teardown(stubber: Stubber) -> None:
    expect_describe_endpoint(stubber, "InService")
    stubber.add_response("delete_endpoint", {}, {"EndpointName": NAME})
    stubber.add_response("describe_endpoint_config", {
        "EndpointConfigName": NAMES.endpoint_config, "ProductionVariants": [
            {"VariantName": "AllTraffic", "ModelName": NAMES.model}],
        "EndpointConfigArn": f"{ARN}:endpoint-config/{NAMES.endpoint_config}",
        "CreationTime": NOW}, {"EndpointConfigName": NAMES.endpoint_config})
    stubber.add_response("delete_endpoint_config", {},
                         {"EndpointConfigName": NAMES.endpoint_config})
    stubber.add_response("describe_model", {"ModelName": NAMES.model, "CreationTime": NOW,
                                            "ModelArn": f"{ARN}:model/{NAMES.model}"},
                         {"ModelName": NAMES.model})
    stubber.add_response("delete_model", {}, {"ModelName": NAMES.model})


GONE = {"endpoint": ("describe_endpoint", "endpoint", NAME),
        "config": ("describe_endpoint_config", "endpoint configuration", NAMES.endpoint_config),
        "model": ("describe_model", "model", NAMES.model)}


def expect_gone(stubber: Stubber, *which: str) -> None:
    """SageMaker's answers for names that do not exist."""
    for operation, kind, name in (GONE[key] for key in which or GONE):
        stubber.add_client_error(operation, "ValidationException",
                                 f'Could not find {kind} "{name}".')


def test_teardown_deletes_all_three_then_rerun_finds_nothing(aws, capsys):
    session, stubber = aws
    expect_teardown(stubber)
    assert teardown.main(["--region", REGION], session=session) == 0
    out = capsys.readouterr().out
    for line in ("endpoint lmcache-ext-test: deleted",
                 "endpoint config lmcache-ext-test-config: deleted",
                 "model lmcache-ext-test-model: deleted"):
        assert line in out
    expect_gone(stubber)
    assert teardown.main(["--region", REGION], session=session) == 0
    out = capsys.readouterr().out
    assert "nothing to delete" in out and "endpoint lmcache-ext-test: not found" in out


def test_teardown_of_an_endpoint_being_deleted_is_fine(aws, capsys):
    session, stubber = aws
    expect_describe_endpoint(stubber, "Deleting")
    expect_gone(stubber, "config", "model")
    assert teardown.main(["--region", REGION], session=session) == 0
    assert "endpoint lmcache-ext-test: already deleting" in capsys.readouterr().out


def test_teardown_access_denied_exits_non_zero_naming_it(aws, capsys):
    session, stubber = aws
    denied = f"User: arn:aws:iam::{ACCOUNT}:user/dev is not authorized to perform: " \
             f"sagemaker:DescribeEndpoint"
    stubber.add_client_error("describe_endpoint", "AccessDeniedException", denied)
    expect_gone(stubber, "config", "model")  # the others are still tried
    code = teardown.main(["--region", REGION], session=session)
    captured = capsys.readouterr()
    assert code == 1
    assert f"endpoint lmcache-ext-test: failed: AccessDeniedException: {denied}" in captured.err
    assert "not all deleted: endpoint lmcache-ext-test" in captured.err
    assert "model lmcache-ext-test-model: not found" in captured.out


def no_credentials_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
            "AWS_CONFIG_FILE": "/nonexistent/config", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_DEFAULT_REGION": REGION, "PYTHONPATH": str(REPO)}


def run_module(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, env=no_credentials_env(), timeout=60)


def test_deploy_without_credentials_prints_the_plan_and_exits_2():
    done = run_module("sagemaker_tests.deploy", "--model-id", MODEL_ID, "--env-file",
                      str(SEED_ENV), "--model-data-url", DATA)
    assert done.returncode == 2, done.stderr
    assert "no AWS credentials" in done.stderr and "nothing was created" in done.stderr
    for part in ("would create:", "endpoint:        lmcache-ext-test",
                 "model:           lmcache-ext-test-model", "ml.g6e.xlarge",
                 f"OPTION_KV_TRANSFER_CONFIG={SEED_KV}", "OPTION_ENABLE_STATEFUL_SESSIONS=true",
                 "<account>.dkr.ecr.us-east-1.amazonaws.com/lmcache-ext-lmi:0.36.0-lmi27.0.0-"
                 "cu130-lmcache-ext-0.1.0",
                 "docker build --build-arg BASE_IMAGE=763104351884.dkr.ecr.us-east-1.amazonaws"
                 ".com/djl-inference:0.36.0-lmi27.0.0-cu130", "docker push <account>"):
        assert part in done.stdout


def test_teardown_without_credentials_prints_what_and_exits_2():
    done = run_module("sagemaker_tests.teardown", "--name", "my-test")
    assert done.returncode == 2
    assert "would delete:" in done.stdout and "my-test-config" in done.stdout
    assert "no AWS credentials" in done.stderr and "nothing was deleted" in done.stderr


def test_dry_run_exits_0_and_masks_secrets(tmp_path):
    env_file = tmp_path / "my.env"
    env_file.write_text(SEED_ENV.read_text() + "HF_TOKEN=hf_verysecret\n")
    done = run_module("sagemaker_tests.deploy", "--dry-run", "--model-id", MODEL_ID,
                      "--env-file", str(env_file), "--model-data-url", DATA, "--image-uri", IMAGE)
    assert done.returncode == 0, done.stderr
    assert f"image:           {IMAGE}" in done.stdout and "docker build" not in done.stdout
    assert "HF_TOKEN=****" in done.stdout and "verysecret" not in done.stdout


def test_malformed_env_file_line_is_an_error_naming_it(tmp_path, capsys):
    env_file = tmp_path / "bad.env"
    env_file.write_text("# ok\nOPTION_A=1\n\nthis line has no equals sign\n")
    assert deploy.main(["--dry-run", "--region", REGION, "--env-file", str(env_file),
                        "--model-id", MODEL_ID]) == 2
    assert f"{env_file} line 4: expected KEY=VALUE" in capsys.readouterr().err


def test_env_file_values_keep_equals_and_json():
    env = parse_env('# c\nA=x=y\nOPTION_KV_TRANSFER_CONFIG={"a": "b=c"}\n  B=  \n')
    assert env == {"A": "x=y", "OPTION_KV_TRANSFER_CONFIG": '{"a": "b=c"}', "B": ""}
    assert read_env_file(SEED_ENV)["OPTION_KV_TRANSFER_CONFIG"] == SEED_KV
    with pytest.raises(EnvFileError, match="line 2: A is already set on line 1"):
        parse_env("A=1\nA=2")
    with pytest.raises(EnvFileError, match="line 1: 'MY KEY' is not a variable name"):
        parse_env("MY KEY=1")
    with pytest.raises(EnvFileError, match="cannot read"):
        read_env_file("/nonexistent/x.env")


def test_masking():
    shown = masked({"HF_TOKEN": "t", "REDIS_PASSWORD": "p",
                    "OPTION_LMCACHE_REMOTE_PASSWORD_ENV": "REDIS_PASSWORD",
                    "OPTION_LMCACHE_REMOTE_URL": "redis://user:pw@cache:6379",
                    "OPTION_MODEL_ID": MODEL_ID})
    assert shown == {"HF_TOKEN": "****", "REDIS_PASSWORD": "****",
                     "OPTION_LMCACHE_REMOTE_PASSWORD_ENV": "REDIS_PASSWORD",
                     "OPTION_LMCACHE_REMOTE_URL": "redis://****@cache:6379",
                     "OPTION_MODEL_ID": MODEL_ID}


def test_image_uri_derivation():
    assert base_tag() == "0.36.0-lmi27.0.0-cu130"  # the Dockerfile's ARG BASE_IMAGE
    given = plan_image("eu-central-2", IMAGE, None)
    assert (given.uri, given.base, given.build) == (IMAGE, None, ())
    ours = plan_image("eu-central-2", None, ACCOUNT, "my-repo")
    assert ours.base == ("380420809688.dkr.ecr.eu-central-2.amazonaws.com/djl-inference:"
                         "0.36.0-lmi27.0.0-cu130")
    assert ours.uri == (f"{ACCOUNT}.dkr.ecr.eu-central-2.amazonaws.com/my-repo:"
                        "0.36.0-lmi27.0.0-cu130-lmcache-ext-0.1.0")
    assert f"docker build --build-arg BASE_IMAGE={ours.base} -t {ours.uri} ." in ours.build
    assert f"docker push {ours.uri}" in ours.build
    assert plan_image(REGION, None, None).uri.startswith("<account>.dkr.ecr.us-east-1.")


def test_plan_checks():
    plan = seed_plan()
    check(plan)
    no_data = DeployPlan(**{**vars(plan), "model_data_url": None})
    with pytest.raises(PlanError, match="OPTION_LMCACHE_CONFIG_FILE=/opt/ml/model/.*"
                                        "--model-data-url"):
        check(no_data)
    with pytest.raises(PlanError, match="--name"):
        Names.of("bad_name")
    assert Names.of("x").endpoint_config == "x-config"
