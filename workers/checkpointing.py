"""Checkpoints on S3 that are complete before anyone can see them: rcm_core checkpoint dir <-> Ray Train.

Every rank writes its DCP shard with `rcm_core.checkpoint.save_checkpoint` into a local temp dir and hands it
to `ray.train.report`, which uploads each rank's files into one checkpoint folder under
`ray/<job id>/<checkpoint dir>/` on S3. Ranks upload independently, so rank 0's files (formerly with
manifest.json among them) could land before another rank's shard. Here the manifest is held back instead:

1. `report_checkpoint` on every rank: save, take rank 0's manifest out of the upload, all-gather every rank's
   file sizes, `ray.train.report` the shard (named `checkpoint-<step>-r<recovery count>`, unique per attempt).
2. Rank 0 then polls the S3 listing until every file of every rank is there with the size that rank wrote
   (`wait_for_files`), and only then writes `manifest.json`, listing those files and sizes (`publish_manifest`).
   If they never all appear, no manifest is written: the checkpoint stays invisible.
3. Readers trust a checkpoint only if its manifest lists files and every listed file is present with its size
   (`complete_checkpoints`; service/cluster.py applies the same rule for GET /checkpoints), and a worker
   resumes from the newest such checkpoint (`restore_latest`), skipping newer incomplete ones.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist
from botocore.exceptions import ClientError

from rcm_core.checkpoint import MANIFEST, save_checkpoint
from workers import storage

UPLOAD_TIMEOUT_S = 300.0  # how long rank 0 waits for the other ranks' shards to appear before giving up


def run_prefix(job_id: str) -> str:
    """The S3 key prefix of the job's Ray Train run (RunConfig name = job id, storage path <bucket>/ray)."""
    return f"ray/{job_id}/"


def checkpoint_dir_name(step: int, recovery_count: int) -> str:
    """Unique per report: a resumed attempt that reaches the same step again writes a new folder."""
    return f"checkpoint-{step:09d}-r{recovery_count}"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_files(path: Path) -> dict[str, int]:
    """Relative path -> size of every file under `path`."""
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}


def _gather(files: dict[str, int]) -> dict[str, int]:
    """The union of every rank's files (all ranks must call it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(files)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, files)
    merged: dict[str, int] = {}
    for part in parts:
        merged |= part
    return merged


def report_checkpoint(app: Any, metrics: dict[str, float], *, job_id: str, step: int, extra: dict[str, Any]) -> None:
    """Save `app` on every rank, report it to Ray Train, and (rank 0) publish the manifest once complete.

    Args:
        app: the `Stateful` saved by rcm_core (the Distiller).
        metrics: reported to Ray Train with the checkpoint.
        job_id: names the run folder on S3.
        step: the training step of this checkpoint.
        extra: manifest fields (recovery_count, train_seconds, ...), read back at resume.
    """
    import ray.train

    name = checkpoint_dir_name(step, int(extra.get("recovery_count", 0)))
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(app, Path(tmp), step, extra=extra)
        manifest: dict[str, Any] | None = None
        if (path / MANIFEST).is_file():  # rank 0: held back until every shard is on S3
            manifest = json.loads((path / MANIFEST).read_text())
            (path / MANIFEST).unlink()
        files = _gather(local_files(path))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)), checkpoint_dir_name=name)
    if _rank() == 0 and manifest is not None:
        s3, bucket = storage.s3_client(), os.environ["RCM_CHECKPOINT_BUCKET"]
        prefix = f"{run_prefix(job_id)}{name}/"
        if wait_for_files(s3, bucket, prefix, files, UPLOAD_TIMEOUT_S):
            publish_manifest(s3, bucket, prefix, manifest, files)


def _listing(s3: Any, bucket: str, prefix: str) -> dict[str, int]:
    """Key (relative to `prefix`) -> size of every object under `prefix`."""
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"].removeprefix(prefix)] = int(obj["Size"])
    return out


def wait_for_files(s3: Any, bucket: str, prefix: str, files: dict[str, int], timeout_s: float) -> bool:
    """Poll until every file is under `prefix` with its size; False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        present = _listing(s3, bucket, prefix)
        if all(present.get(name) == size for name, size in files.items()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def publish_manifest(s3: Any, bucket: str, prefix: str, manifest: dict[str, Any], files: dict[str, int]) -> None:
    """Write manifest.json (the checkpoint's fields plus every file and its size): the checkpoint is complete."""
    body = json.dumps({**manifest, "files": files}, indent=2) + "\n"
    s3.put_object(Bucket=bucket, Key=prefix + MANIFEST, Body=body.encode())


def is_complete(manifest: dict[str, Any], present: dict[str, int]) -> bool:
    """A manifest counts only if it lists its files and each is present (relative name -> size) at that size."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or "step" not in manifest:
        return False
    return all(present.get(name) == size for name, size in files.items())


def complete_checkpoints(s3: Any, bucket: str, job_id: str) -> list[tuple[int, str]]:
    """(step, key prefix) of every complete checkpoint of the job, oldest first."""
    listing = _listing(s3, bucket, run_prefix(job_id))
    out = []
    for key in listing:
        if not key.endswith("/" + MANIFEST):
            continue
        folder = key.removesuffix(MANIFEST)
        try:
            manifest = json.loads(s3.get_object(Bucket=bucket, Key=run_prefix(job_id) + key)["Body"].read())
        except (ValueError, ClientError):  # unreadable or not JSON: not complete
            continue
        present = {k.removeprefix(folder): v for k, v in listing.items() if k.startswith(folder)}
        if is_complete(manifest, present):
            out.append((int(manifest["step"]), run_prefix(job_id) + folder))
    return sorted(out)


@contextmanager
def restore_latest(job_id: str) -> Iterator[Path | None]:
    """The newest complete checkpoint of the job, downloaded to a temp dir (None: nothing to resume from).

    Used instead of `ray.train.get_checkpoint()`, which returns whatever Ray registered last, complete or not.
    """
    s3, bucket = storage.s3_client(), os.environ["RCM_CHECKPOINT_BUCKET"]
    found = complete_checkpoints(s3, bucket, job_id)
    if not found:
        yield None
        return
    _, prefix = found[-1]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + MANIFEST)["Body"].read())
    with tempfile.TemporaryDirectory() as tmp:
        for name in [*manifest["files"], MANIFEST]:
            dest = Path(tmp) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, prefix + name, str(dest))
        yield Path(tmp)
