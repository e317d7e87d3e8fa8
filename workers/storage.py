"""S3 access for workers: teacher download, cancel marker, exports. Endpoint and keys come from the env."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


class TeacherUnavailable(RuntimeError):
    """The teacher URI cannot be read; the message is shown to the user as the failure reason."""


def s3_client():
    return boto3.client(
        "s3",
        endpoint_url=os.environ["RCM_S3_ENDPOINT_URL"],
        region_name=os.environ.get("RCM_S3_REGION", "us-east-1"),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def download(uri: str, dest: Path) -> Path:
    bucket, key = split_uri(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        s3_client().download_file(bucket, key, str(dest))
    except (ClientError, BotoCoreError) as exc:
        raise TeacherUnavailable(f"teacher.uri {uri}: cannot read it ({exc})") from None
    return dest


def upload(path: Path, uri: str) -> None:
    bucket, key = split_uri(uri)
    s3_client().upload_file(str(path), bucket, key)


def cancel_requested(job_id: str) -> bool:
    try:
        s3_client().head_object(Bucket=os.environ["RCM_CHECKPOINT_BUCKET"], Key=f"jobs/{job_id}/CANCEL")
        return True
    except ClientError:
        return False
