"""Deploy lmcache-ext on SageMaker LMI: ``python -m sagemaker_tests.deploy --model-id ... \
--env-file sagemaker_tests/seed.env --model-data-url s3://... --role-arn ...``.

Creates the model, endpoint config and endpoint (SDK v3: ``Model.create``,
``EndpointConfig.create``, ``Endpoint.create``) and waits for InService. Prints the plan first.
``--dry-run`` prints it and touches nothing; without AWS credentials it prints it and exits 2.
Exit codes: 0 done (or dry run), 1 AWS said no or the endpoint failed, 2 nothing was created
(bad arguments, no credentials, no region).
"""

from __future__ import annotations

import argparse
import sys

import boto3

from sagemaker_tests.control import (
    DEFAULT_WAIT_S,
    POLL_S,
    ControlError,
    account_id,
    create,
    wait_in_service,
)
from sagemaker_tests.deployment import (
    DEFAULT_INSTANCE,
    DEFAULT_NAME,
    DeployPlan,
    Names,
    PlanError,
    check,
    describe,
    environment,
    routing_plan,
)
from sagemaker_tests.envfile import EnvFileError, read_env_file
from sagemaker_tests.images import DEFAULT_REPOSITORY, ImageError, plan_image

EXIT_FAILED = 1
EXIT_NOTHING_DONE = 2
NO_CREDENTIALS = ("no AWS credentials: set AWS_PROFILE (or AWS_ACCESS_KEY_ID and "
                  "AWS_SECRET_ACCESS_KEY, or run on a role); nothing was {}")
NO_REGION = "no AWS region: pass --region or set AWS_DEFAULT_REGION (or a profile's region)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sagemaker_tests.deploy",
                                description=__doc__.split("\n\n")[1].replace("``", ""))
    p.add_argument("--name", default=DEFAULT_NAME,
                   help="endpoint name; the config and model are <name>-config, <name>-model "
                        "(default: %(default)s)")
    p.add_argument("--model-id", help="OPTION_MODEL_ID (a Hugging Face id or s3:// URL); or set "
                                      "it in --env-file")
    p.add_argument("--env-file", help="KEY=VALUE lines for the container (# comments), e.g. "
                                      "sagemaker_tests/seed.env")
    p.add_argument("--model-data-url",
                   help="model artifacts: s3://.../model.tar.gz, or an s3://.../ prefix copied "
                        "as is. The seed's OPTION_LMCACHE_CONFIG_FILE=/opt/ml/model/"
                        "lmcache_config.yaml must be in them; or drop that line and set the "
                        "cache with OPTION_LMCACHE_* keys (e.g. OPTION_LMCACHE_MAX_LOCAL_CPU_SIZE)")
    p.add_argument("--image-uri", help="the image to run; default: our image (LMI + lmcache-ext) "
                                       "in this account's ECR, tagged after the Dockerfile's base")
    p.add_argument("--repository", default=DEFAULT_REPOSITORY,
                   help="ECR repository of our image, without --image-uri (default: %(default)s)")
    p.add_argument("--role-arn", help="SageMaker execution role (required to deploy)")
    p.add_argument("--region", help="default: boto3's (AWS_DEFAULT_REGION, the profile's region)")
    p.add_argument("--instance", default=DEFAULT_INSTANCE, help="default: %(default)s")
    p.add_argument("--instance-count", type=int, default=1, help="default: %(default)s")
    p.add_argument("--routing-strategy",
                   help="the variant's RoutingConfig: LEAST_OUTSTANDING_REQUESTS, RANDOM or "
                        "PREFIX_AWARE (default: SageMaker's)")
    p.add_argument("--prefix-length", type=int,
                   help="PREFIX_AWARE: bytes of the request body hashed (1024-65536; "
                        "lmcache-ext advise --shared-prefix-tokens N suggests one)")
    p.add_argument("--concurrency-threshold", type=int,
                   help="PREFIX_AWARE: requests in flight on an instance before another takes "
                        "the prefix's request (1-1024)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="wait for InService (default: wait)")
    p.add_argument("--timeout", type=int, default=DEFAULT_WAIT_S,
                   help="seconds to wait (default: %(default)s)")
    p.add_argument("--poll", type=int, default=POLL_S, help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true", help="print the plan; touch nothing")
    return p


def fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def session_and_region(region: str | None,
                       session: boto3.Session | None) -> tuple[boto3.Session, str | None]:
    """The session to use (the given one, else boto3's default for ``region``) and the region:
    ``--region``, else the session's (None: nowhere to go)."""
    session = session or boto3.Session(region_name=region)
    return session, region or session.region_name


def main(argv: list[str] | None = None, session: boto3.Session | None = None) -> int:
    args = parser().parse_args(argv)
    session, region = session_and_region(args.region, session)
    if not region:
        return fail(NO_REGION, EXIT_NOTHING_DONE)
    live = not args.dry_run and session.get_credentials() is not None
    try:
        names = Names.of(args.name)
        routing = routing_plan(args.routing_strategy, args.prefix_length,
                               args.concurrency_threshold)
        env_file = read_env_file(args.env_file) if args.env_file else {}
        account = account_id(session, region) if live and not args.image_uri else None
        image = plan_image(region, args.image_uri, account, args.repository)
        plan = DeployPlan(names=names, region=region, image=image, role_arn=args.role_arn,
                          instance_type=args.instance, instance_count=args.instance_count,
                          environment=environment(env_file, args.model_id),
                          model_data_url=args.model_data_url, routing=routing)
        check(plan)
    except (PlanError, EnvFileError, ImageError) as error:
        return fail(str(error), EXIT_NOTHING_DONE)
    except ControlError as error:
        return fail(str(error), EXIT_FAILED)
    print(("would create" if not live else "creating") + ":\n" + describe(plan), flush=True)
    if args.dry_run:
        return 0
    if not live:
        return fail(NO_CREDENTIALS.format("created"), EXIT_NOTHING_DONE)
    if not plan.role_arn:
        return fail("--role-arn is required to deploy (the SageMaker execution role that pulls "
                    "the image and the model artifacts); nothing was created", EXIT_NOTHING_DONE)
    try:
        endpoint = create(plan, session)
        if args.wait:
            print(f"waiting up to {args.timeout} s for {names.endpoint} to be InService",
                  flush=True)
            wait_in_service(endpoint, timeout_s=args.timeout, poll_s=args.poll)
            print(f"{names.endpoint} is InService: SAGEMAKER_ENDPOINT_NAME={names.endpoint} "
                  f"AWS_REGION={region} pytest sagemaker_tests")
    except ControlError as error:
        return fail(str(error), EXIT_FAILED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
