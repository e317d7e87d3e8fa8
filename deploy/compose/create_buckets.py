"""One-shot bucket creation for the compose stack (service `bucket-init`): any S3-compatible store.

    python create_buckets.py BUCKET [BUCKET ...]

Idempotent: a bucket that already exists is left as it is. Endpoint and keys come from S3_ENDPOINT_URL,
S3_ACCESS_KEY, S3_SECRET_KEY and S3_REGION (the control plane's names), path-style addressing as SeaweedFS needs.
"""

from __future__ import annotations

import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def main(buckets: list[str]) -> int:
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["S3_ENDPOINT_URL"],
        aws_access_key_id=os.environ["S3_ACCESS_KEY"],
        aws_secret_access_key=os.environ["S3_SECRET_KEY"],
        region_name=os.environ["S3_REGION"],
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 5}),
    )
    for bucket in buckets:
        try:
            s3.create_bucket(Bucket=bucket)
            sys.stdout.write(f"bucket-init: created {bucket}\n")
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
            sys.stdout.write(f"bucket-init: {bucket} exists\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: create_buckets.py BUCKET [BUCKET ...]")
    sys.exit(main(sys.argv[1:]))
