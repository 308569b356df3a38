"""Delete what ``python -m sagemaker_tests.deploy`` created: ``python -m
sagemaker_tests.teardown --name <name>``.

Deletes the endpoint, the endpoint config and the model; one already gone (or being deleted) is
fine, so it is always safe to re-run. SageMaker deletes the endpoint in the background (billing
stops as it goes). Exit codes: 0 done or nothing to delete, 1 AWS refused a delete (each is
named), 2 nothing was deleted (no credentials, no region, bad name).
"""

from __future__ import annotations

import argparse
import sys

import boto3

from sagemaker_tests.control import teardown
from sagemaker_tests.deploy import (
    EXIT_FAILED,
    EXIT_NOTHING_DONE,
    NO_CREDENTIALS,
    NO_REGION,
    fail,
    session_and_region,
)
from sagemaker_tests.deployment import DEFAULT_NAME, Names, PlanError, describe_teardown


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sagemaker_tests.teardown",
                                description=__doc__.split("\n\n")[1].replace("``", ""))
    p.add_argument("--name", default=DEFAULT_NAME,
                   help="the name given to deploy (default: %(default)s)")
    p.add_argument("--region", help="default: boto3's (AWS_DEFAULT_REGION, the profile's region)")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted")
    return p


def main(argv: list[str] | None = None, session: boto3.Session | None = None) -> int:
    args = parser().parse_args(argv)
    session, region = session_and_region(args.region, session)
    if not region:
        return fail(NO_REGION, EXIT_NOTHING_DONE)
    try:
        names = Names.of(args.name)
    except PlanError as error:
        return fail(str(error), EXIT_NOTHING_DONE)
    live = not args.dry_run and session.get_credentials() is not None
    print(("would delete" if not live else "deleting") + ":\n" + describe_teardown(names, region),
          flush=True)
    if args.dry_run:
        return 0
    if not live:
        return fail(NO_CREDENTIALS.format("deleted"), EXIT_NOTHING_DONE)
    done = teardown(names, region, session)
    for item in done:
        print(f"{item.kind} {item.name}: {item.outcome}", file=sys.stderr if item.failed
              else sys.stdout)
    if any(item.failed for item in done):
        return fail("not all deleted: " + ", ".join(f"{item.kind} {item.name}" for item in done
                                                     if item.failed), EXIT_FAILED)
    if all(item.outcome == "not found" for item in done):
        print("nothing to delete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
