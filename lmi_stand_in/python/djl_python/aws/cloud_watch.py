"""LMI's CloudWatch poster (djl_python/aws/cloud_watch.py at the commit the package doc names,
lines 16-39): built with ``boto3.client("cloudwatch")`` where boto3 is installed, so without an
AWS region it raises (botocore's NoRegionError) and LMI's session manager, and with it the model,
fails to load. Posts are best effort. The stand-in never posts (no network in tests)."""

from __future__ import annotations

import logging


class CloudWatch:
    def __init__(self) -> None:
        try:
            import boto3
        except ImportError:
            self.client = False
            return
        self.client = boto3.client("cloudwatch")

    def post(self, key: str) -> None:
        logging.debug("stand-in CloudWatch: %s (not posted)", key)
