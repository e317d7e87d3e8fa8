"""S3 access for workers: teacher (file or diffusers folder) and prompt-file downloads, cancel marker, exports.
Endpoint and keys: the env."""

from __future__ import annotations

import json
import os
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


class TeacherUnavailable(RuntimeError):
    """The teacher URI cannot be read; the message is shown to the user as the failure reason."""


class PromptFileUnavailable(RuntimeError):
    """The prompt file cannot be read; the message is shown to the user as the failure reason."""


def s3_client():
    return boto3.client(
        "s3",
        endpoint_url=os.environ["RCM_S3_ENDPOINT_URL"],
        region_name=os.environ.get("RCM_S3_REGION", "us-east-1"),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


def s3_filesystem():
    """pyarrow's S3 filesystem for the env's endpoint and keys (Ray Train's storage, streamed datasets)."""
    import pyarrow.fs

    endpoint = os.environ["RCM_S3_ENDPOINT_URL"]
    scheme, _, host = endpoint.partition("://")
    # NOTE: pyarrow ignores AWS_ENDPOINT_URL: the endpoint must be passed explicitly.
    return pyarrow.fs.S3FileSystem(
        endpoint_override=host,
        scheme=scheme,
        access_key=os.environ["AWS_ACCESS_KEY_ID"],
        secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region=os.environ.get("RCM_S3_REGION", "us-east-1"),
    )


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def s3_reason(exc: Exception) -> str:
    """Why an S3 call failed, in a few words: no endpoint URL, local path or server text (a failure reason is
    shown through the API)."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            return "no such object"
        if code in ("403", "AccessDenied", "Forbidden"):
            return "access denied"
        return f"storage error {code}".strip()
    return "storage unavailable"


def download(uri: str, dest: Path) -> Path:
    bucket, key = split_uri(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        s3_client().download_file(bucket, key, str(dest))
    except (ClientError, BotoCoreError) as exc:
        raise TeacherUnavailable(f"teacher.uri {uri}: cannot read it ({s3_reason(exc)})") from None
    return dest


# What a diffusers transformer folder holds that from_pretrained reads: config.json and the weights (one
# safetensors file, or shards + index). Anything else under the prefix (a README, a .bin) is left in S3.
TEACHER_DIR_FILES = ("config.json", ".safetensors", ".safetensors.index.json")
MAX_CONFIG_BYTES = 1 << 20  # a transformer's config.json is under 2 KiB; anything larger is not one


def read_teacher_config(uri: str) -> bytes:
    """The config.json of the diffusers teacher folder `uri` (s3://bucket/prefix/), at most MAX_CONFIG_BYTES.

    Raises:
        TeacherUnavailable: missing, unreadable or too large (the message never holds the content).
    """
    bucket, key = split_uri(uri.rstrip("/") + "/config.json")
    try:
        obj = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{MAX_CONFIG_BYTES}")
        body = obj["Body"].read(MAX_CONFIG_BYTES + 1)
    except (ClientError, BotoCoreError) as exc:
        reason = s3_reason(exc)
        if reason == "no such object":
            reason = "no config.json under it: not a diffusers transformer folder (save_pretrained layout)"
        raise TeacherUnavailable(f"teacher.uri {uri}: cannot read it ({reason})") from None
    if len(body) > MAX_CONFIG_BYTES:
        raise TeacherUnavailable(f"teacher.uri {uri}: config.json is over {MAX_CONFIG_BYTES} bytes")
    return body


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
MAX_INDEX_BYTES = 64 << 20  # a 14B model's index is ~100 KiB


def check_teacher_weights(uri: str) -> None:
    """The diffusers teacher folder `uri` holds the weights from_pretrained reads: diffusion_pytorch_model
    .safetensors, or an index and every shard it names. Checked before any worker starts (a missing shard would
    otherwise fail every worker, and be retried).

    Raises:
        TeacherUnavailable: naming what is missing (never the index's content).
    """
    bucket, prefix = split_uri(uri.rstrip("/") + "/")
    client = s3_client()
    try:
        names = {
            o["Key"].removeprefix(prefix)
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            for o in page.get("Contents", [])
        }
        if WEIGHTS_NAME in names:
            return
        if INDEX_NAME not in names:
            raise TeacherUnavailable(f"teacher.uri {uri}: no {WEIGHTS_NAME} and no {INDEX_NAME} under it")
        body = client.get_object(Bucket=bucket, Key=prefix + INDEX_NAME)["Body"].read(MAX_INDEX_BYTES + 1)
    except (ClientError, BotoCoreError) as exc:
        raise TeacherUnavailable(f"teacher.uri {uri}: cannot read it ({s3_reason(exc)})") from None
    try:
        weight_map = json.loads(body)["weight_map"]
        shards = {str(v) for v in weight_map.values()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TeacherUnavailable(f"teacher.uri {uri}: {INDEX_NAME} is not a safetensors index") from None
    missing = shards - names
    if missing or not shards:
        raise TeacherUnavailable(
            f"teacher.uri {uri}: {len(missing)} of the {len(shards)} shards {INDEX_NAME} names are not under it"
        )


def download_prefix(uri: str, dest: Path) -> Path:
    """Download the diffusers teacher folder `uri` (s3://bucket/prefix/) to the directory `dest`: config.json and
    the safetensors weights (shards and index), in the layout save_pretrained writes. Sub-folders are not read.

    Raises:
        TeacherUnavailable: the prefix cannot be listed or read, or holds no config.json.
    """
    bucket, prefix = split_uri(uri.rstrip("/") + "/")
    client = s3_client()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        keys = [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            for o in page.get("Contents", [])
        ]
        wanted = [k for k in keys if k.removeprefix(prefix).endswith(TEACHER_DIR_FILES)]
        if prefix + "config.json" not in wanted:
            raise TeacherUnavailable(
                f"teacher.uri {uri}: no config.json under it: not a diffusers transformer folder (save_pretrained "
                "layout)"
            )
        for key in wanted:
            client.download_file(bucket, key, str(dest / key.removeprefix(prefix)))
    except (ClientError, BotoCoreError) as exc:
        raise TeacherUnavailable(f"teacher.uri {uri}: cannot read it ({s3_reason(exc)})") from None
    return dest


def fetch_prompt_file(uri: str, dest: Path) -> Path:
    """The job's prompt file as a local file: an s3:// object is downloaded to `dest`; a relative path names a
    file under the directory in RCM_PROMPT_DIR on the worker nodes, used in place.

    NOTE: never an arbitrary local path: a parse error quotes the offending line, so a path like
    /proc/self/environ would put the workers' environment (S3 keys included) into the job's failure reason.
    """
    if uri.startswith("s3://"):
        bucket, key = split_uri(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            s3_client().download_file(bucket, key, str(dest))
        except (ClientError, BotoCoreError) as exc:
            raise PromptFileUnavailable(f"data.prompt_file_uri {uri}: cannot read it ({s3_reason(exc)})") from None
        return dest
    root = os.environ.get("RCM_PROMPT_DIR")
    if not root:
        raise PromptFileUnavailable(
            f"data.prompt_file_uri {uri}: local prompt files are not enabled on this cluster "
            "(RCM_PROMPT_DIR is not set on its nodes); upload the file and pass s3://bucket/key"
        )
    base = Path(root).resolve()
    path = (base / uri).resolve()
    if not path.is_relative_to(base):
        raise PromptFileUnavailable(f"data.prompt_file_uri {uri}: outside the cluster's prompt directory")
    if not path.is_file():
        raise PromptFileUnavailable(f"data.prompt_file_uri {uri}: no such file in the cluster's prompt directory")
    return path


def upload(path: Path, uri: str) -> None:
    bucket, key = split_uri(uri)
    s3_client().upload_file(str(path), bucket, key)


def cancel_requested(job_id: str) -> bool:
    try:
        s3_client().head_object(Bucket=os.environ["RCM_CHECKPOINT_BUCKET"], Key=f"jobs/{job_id}/CANCEL")
        return True
    except ClientError:
        return False


def put_json(payload: dict, key: str) -> None:
    """Write `payload` as JSON to the checkpoint bucket (e.g. jobs/<id>/effective_config.json, read by the API)."""
    body = json.dumps(payload).encode()
    s3_client().put_object(Bucket=os.environ["RCM_CHECKPOINT_BUCKET"], Key=key, Body=body)


def write_failure(job_id: str, reason: str) -> None:
    """Record why the workers ended the job (read by the entrypoint after Ray Train returns)."""
    s3_client().put_object(
        Bucket=os.environ["RCM_CHECKPOINT_BUCKET"], Key=f"jobs/{job_id}/FAILURE", Body=reason.encode()
    )


def failure_reason(job_id: str) -> str | None:
    try:
        obj = s3_client().get_object(Bucket=os.environ["RCM_CHECKPOINT_BUCKET"], Key=f"jobs/{job_id}/FAILURE")
    except ClientError:
        return None
    return obj["Body"].read().decode(errors="replace")[:2000]
