"""The only module that talks to the compute cluster: Ray's Jobs REST API, MLflow's REST API and S3.

`Cluster` is the interface the routes and the reconciler use; `RayCluster` implements it over HTTP so the
control plane needs neither ray nor torch installed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.settings import Settings

RAY_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOST = "LOST"  # not a Ray state: the cluster answers but no longer knows the job (head restart, deleted RayJob)
WORKER_ERROR = "rcm-worker: error:"  # the one line workers/entrypoint.py writes for the user


def public_failure(message: str | None) -> str | None:
    """The part of a Ray job message fit for the API's failure reason: the worker's last error line, else Ray's
    first line. Never the log tail Ray appends (tracebacks, local paths, possibly file contents)."""
    if not message:
        return message
    at = message.rfind(WORKER_ERROR)
    if at >= 0:
        return message[at:].splitlines()[0][:2000]
    return message.splitlines()[0].split(", last available logs")[0][:500]


@dataclass
class ClusterJobStatus:
    status: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED (Ray's job states), or LOST
    message: str | None = None


@contextmanager
def _s3_errors() -> Iterator[None]:
    """Object storage not answering (connection refused/timed out, 5xx/403) as ClusterUnavailable."""
    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise ClusterUnavailable(f"object storage unavailable ({type(exc).__name__})") from exc


class ClusterUnavailable(Exception):
    """A backend a request needs (S3, Ray, MLflow) did not answer; the API turns this into 503 + Retry-After."""


class Cluster(Protocol):
    def create_run(self, experiment: str, job_id: str, name: str) -> str: ...
    def submit(self, job_id: str, spec: dict[str, Any], run_id: str) -> str: ...
    def submit_task(self, submission_id: str, entrypoint: str, env: dict[str, str]) -> str: ...
    def status(self, submission_id: str) -> ClusterJobStatus: ...
    def request_cancel(self, job_id: str) -> None: ...
    def stop(self, submission_id: str) -> None: ...
    def run_progress(self, run_id: str) -> dict[str, float]: ...
    def set_run_status(self, run_id: str, status: str) -> None: ...
    def run_url(self, run_id: str) -> str: ...
    def checkpoints(self, job_id: str) -> list[dict[str, Any]]: ...
    def put_input(self, bucket: str, key: str, body: Any) -> None: ...
    def list_inputs(self, bucket: str, prefix: str) -> list[dict[str, Any]]: ...
    def delete_input(self, bucket: str, key: str) -> None: ...
    def read_input(self, bucket: str, key: str, max_bytes: int) -> bytes | None: ...
    def effective_config(self, job_id: str) -> dict[str, Any] | None: ...
    def healthy(self) -> dict[str, bool]: ...


def s3_client(settings: Settings):
    return boto3.client(
        "s3",
        endpoint_url=settings.S3_ENDPOINT_URL,
        aws_access_key_id=settings.S3_ACCESS_KEY,
        aws_secret_access_key=settings.S3_SECRET_KEY,
        region_name=settings.S3_REGION,
        # Short connect timeout: a request waiting on an unreachable S3 holds an API thread (boto3's default is 60 s).
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 2},
            connect_timeout=5,
            read_timeout=30,
        ),
    )


def cancel_marker_key(job_id: str) -> str:
    return f"jobs/{job_id}/CANCEL"


def effective_config_key(job_id: str) -> str:
    return f"jobs/{job_id}/effective_config.json"


def checkpoint_prefix(job_id: str) -> str:
    return f"ray/{job_id}/"


class RayCluster:
    def __init__(self, settings: Settings):
        self.settings = settings
        headers = {"Authorization": f"Bearer {settings.RAY_AUTH_TOKEN}"} if settings.RAY_AUTH_TOKEN else {}
        self.ray = httpx.Client(base_url=settings.RAY_DASHBOARD_URL, headers=headers, timeout=10.0)
        self.mlflow = httpx.Client(base_url=settings.MLFLOW_TRACKING_URI, timeout=10.0)
        self.s3 = s3_client(settings)

    # -- MLflow --------------------------------------------------------------------------------------
    def _experiment_id(self, name: str) -> str:
        r = self.mlflow.get("/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
        if r.status_code == 200:
            return r.json()["experiment"]["experiment_id"]
        r = self.mlflow.post("/api/2.0/mlflow/experiments/create", json={"name": name})
        if r.status_code != 200 and "RESOURCE_ALREADY_EXISTS" in r.text:  # created concurrently
            return self._experiment_id(name)
        r.raise_for_status()
        return r.json()["experiment_id"]

    def create_run(self, experiment: str, job_id: str, name: str) -> str:
        body = {
            "experiment_id": self._experiment_id(experiment),
            "run_name": f"{name}-{job_id[:8]}",
            "tags": [{"key": "rcm.job_id", "value": job_id}],
        }
        r = self.mlflow.post("/api/2.0/mlflow/runs/create", json=body)
        r.raise_for_status()
        return r.json()["run"]["info"]["run_id"]

    def run_progress(self, run_id: str) -> dict[str, float]:
        r = self.mlflow.get("/api/2.0/mlflow/runs/get", params={"run_id": run_id})
        r.raise_for_status()
        return {m["key"]: float(m["value"]) for m in r.json()["run"]["data"].get("metrics", [])}

    def set_run_status(self, run_id: str, status: str) -> None:
        r = self.mlflow.get("/api/2.0/mlflow/runs/get", params={"run_id": run_id})
        if r.status_code == 200 and r.json()["run"]["info"]["status"] == "RUNNING":
            self.mlflow.post("/api/2.0/mlflow/runs/update", json={"run_id": run_id, "status": status})

    def run_url(self, run_id: str) -> str:
        return f"{self.settings.MLFLOW_TRACKING_URI}/#/runs/{run_id}"

    # -- Ray Jobs ------------------------------------------------------------------------------------
    def submit(self, job_id: str, spec: dict[str, Any], run_id: str) -> str:
        s = self.settings
        # NOTE: no secrets here: Ray shows a job's runtime_env to anyone who can read its dashboard. The S3
        # keys reach the workers through the Ray nodes' own environment (stack.py locally, a Kubernetes
        # Secret on KubeRay); the job spec and this env carry only names and URLs.
        env = {
            "RCM_JOB_ID": job_id,
            "RCM_JOB_SPEC": json.dumps(spec),
            "RCM_MLFLOW_RUN_ID": run_id,
            "MLFLOW_TRACKING_URI": s.MLFLOW_TRACKING_URI,
            "RCM_S3_ENDPOINT_URL": s.S3_ENDPOINT_URL,
            "RCM_S3_REGION": s.S3_REGION,
            "RCM_CHECKPOINT_BUCKET": s.CHECKPOINT_BUCKET,
        }
        body = {
            "entrypoint": s.WORKER_ENTRYPOINT,
            "submission_id": f"rcm-{job_id}",
            "runtime_env": {"env_vars": env},
            "metadata": {"rcm_job_id": job_id},
        }
        r = self.ray.post("/api/jobs/", json=body)
        r.raise_for_status()
        return r.json()["submission_id"]

    def submit_task(self, submission_id: str, entrypoint: str, env: dict[str, str]) -> str:
        """Run `entrypoint` as one Ray job (a sample preview, a dataset preparation: service/operations.py) with
        the S3 endpoint, checkpoint bucket and `env`; it asks Ray for TASK_CPUS CPUs, so it waits PENDING while
        training holds them. No secrets here either (see `submit`)."""
        s = self.settings
        base = {"RCM_S3_ENDPOINT_URL": s.S3_ENDPOINT_URL, "RCM_S3_REGION": s.S3_REGION}
        body = {
            "entrypoint": entrypoint,
            "submission_id": submission_id,
            "runtime_env": {"env_vars": {**base, "RCM_CHECKPOINT_BUCKET": s.CHECKPOINT_BUCKET, **env}},
            "entrypoint_num_cpus": s.TASK_CPUS,
            "metadata": {"rcm_task": submission_id},
        }
        r = self.ray.post("/api/jobs/", json=body)
        r.raise_for_status()
        return str(r.json()["submission_id"])

    def status(self, submission_id: str) -> ClusterJobStatus:
        r = self.ray.get(f"/api/jobs/{submission_id}")
        if r.status_code == 404:  # the head answers but has no such job: it restarted (Ray keeps no job history)
            return ClusterJobStatus(LOST, "the Ray cluster has no record of the job")
        r.raise_for_status()
        data = r.json()
        return ClusterJobStatus(data["status"], public_failure(data.get("message")))

    def stop(self, submission_id: str) -> None:
        self.ray.post(f"/api/jobs/{submission_id}/stop")

    # -- S3 ------------------------------------------------------------------------------------------
    def request_cancel(self, job_id: str) -> None:
        """Raises ClusterUnavailable when object storage does not answer."""
        with _s3_errors():
            self.s3.put_object(Bucket=self.settings.CHECKPOINT_BUCKET, Key=cancel_marker_key(job_id), Body=b"cancel")

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """Complete checkpoints, oldest first: a manifest.json that lists the checkpoint's files, each present at
        its listed size (the worker writes the manifest only after checking that itself: workers/checkpointing.py;
        an older manifest without a file list, or a shard gone missing since, is not trusted). Raises
        ClusterUnavailable when object storage does not answer."""
        with _s3_errors():
            return self._checkpoints(job_id)

    def _checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        bucket, prefix = self.settings.CHECKPOINT_BUCKET, checkpoint_prefix(job_id)
        sizes: dict[str, int] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            sizes |= {obj["Key"]: int(obj["Size"]) for obj in page.get("Contents", [])}
        out = []
        for key in (k for k in sizes if k.endswith("/manifest.json")):
            folder = key.removesuffix("manifest.json")
            try:
                manifest = json.loads(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
                files, step = manifest["files"], int(manifest["step"])
            except (ValueError, KeyError, TypeError):
                continue  # not ours, or not a complete manifest
            if isinstance(files, dict) and files and all(sizes.get(folder + n) == sz for n, sz in files.items()):
                out.append({"step": step, "uri": f"s3://{bucket}/{folder.rstrip('/')}"})
        return sorted(out, key=lambda c: c["step"])

    # Tenant inputs (service/api/routes/inputs.py): S3 errors become ClusterUnavailable (503), never a 500.
    def put_input(self, bucket: str, key: str, body: Any) -> None:
        with _s3_errors():
            self.s3.upload_fileobj(body, bucket, key)

    def list_inputs(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        out = []
        with _s3_errors():
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                out += [{"key": o["Key"], "size": int(o["Size"])} for o in page.get("Contents", [])]
        return out

    def delete_input(self, bucket: str, key: str) -> None:
        with _s3_errors():
            self.s3.delete_object(Bucket=bucket, Key=key)

    def read_input(self, bucket: str, key: str, max_bytes: int) -> bytes | None:
        """At most max_bytes + 1 bytes of a tenant input (more means: over the cap); None when there is none."""
        try:
            obj = self.s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max_bytes}")
            return bytes(obj["Body"].read(max_bytes + 1))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey"):
                return None
            if code == "InvalidRange":  # an empty object: no byte 0 to start the range at
                return b""
            raise ClusterUnavailable(f"object storage unavailable ({type(exc).__name__})") from exc
        except BotoCoreError as exc:
            raise ClusterUnavailable(f"object storage unavailable ({type(exc).__name__})") from exc

    def effective_config(self, job_id: str) -> dict[str, Any] | None:
        """The settings the worker resolved for the job (written before training starts), None before that."""
        try:
            obj = self.s3.get_object(Bucket=self.settings.CHECKPOINT_BUCKET, Key=effective_config_key(job_id))
        except (ClientError, BotoCoreError):  # not written yet, or S3 unreachable: the next poll tries again
            return None
        return json.loads(obj["Body"].read())

    def _probes(self) -> list[tuple[str, Any]]:
        """(name, callable raising on failure) per dependency checked by /readyz; backends swap the first."""
        return [
            ("ray", lambda: self.ray.get("/api/version").raise_for_status()),
            ("mlflow", lambda: self.mlflow.get("/health").raise_for_status()),
            ("s3", lambda: self.s3.head_bucket(Bucket=self.settings.CHECKPOINT_BUCKET)),
        ]

    def healthy(self) -> dict[str, bool]:
        checks = {}
        for name, fn in self._probes():
            try:
                fn()
                checks[name] = True
            except Exception:  # noqa: BLE001  (readiness reports, never raises)
                checks[name] = False
        return checks
