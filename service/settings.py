"""Control-plane settings, read from the environment (or a .env file) once and cached."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PLACEHOLDERS = {"", "changeme", "secret", "password"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    ENVIRONMENT: Literal["development", "test", "production"] = "development"
    DATABASE_URL: str = "sqlite:///./.data/rcm.db"  # or postgresql+psycopg://user:pass@host/db
    RAY_DASHBOARD_URL: str = "http://127.0.0.1:8265"  # Ray Jobs REST API
    RAY_AUTH_TOKEN: str | None = None  # sent as a bearer token to Ray when set (KubeRay authOptions)
    MLFLOW_TRACKING_URI: str = "http://127.0.0.1:5000"
    S3_ENDPOINT_URL: str = "http://127.0.0.1:8333"
    S3_ACCESS_KEY: str  # no default: a secret
    S3_SECRET_KEY: str  # no default: a secret
    S3_REGION: str = "us-east-1"
    CHECKPOINT_BUCKET: str = "ckpt"
    MAX_BODY_BYTES: int = 256 * 1024  # larger request bodies get 413 (input uploads have their own limit)
    # Tenant inputs (teacher files, prompt files): each tenant reads and writes only s3://INPUTS_BUCKET/
    # INPUTS_PREFIX<tenant>/; a job naming any other object is refused at submission (422).
    INPUTS_BUCKET: str = "ckpt"
    INPUTS_PREFIX: str = "tenants/"
    MAX_INPUT_BYTES: int = 512 * 2**20  # PUT /v1/inputs/{name}: larger uploads get 413
    RECONCILE_INTERVAL_S: float = 1.0  # how often stored job state is synced with Ray and MLflow
    # Admission control: jobs handed to the cluster at once (STARTING, RUNNING or CANCELLING), cluster-wide and
    # per tenant; the rest wait QUEUED, first in first out.
    MAX_ACTIVE_JOBS: int = Field(4, ge=1)
    MAX_ACTIVE_JOBS_PER_TENANT: int = Field(2, ge=1)
    START_TIMEOUT_S: float = Field(1800.0, gt=0)  # a job whose workers have not started by then fails (seconds)
    MAX_RESUBMITS: int = Field(2, ge=0)  # a job the cluster lost (head restart) is resubmitted this often
    WORKER_ENTRYPOINT: str = "python -m workers.entrypoint"
    # Operations besides training, each one Ray job (service/operations.py): sample previews and dataset preparation.
    SAMPLES_ENTRYPOINT: str = "python -m workers.samples"
    PREPARE_ENTRYPOINT: str = "python -m workers.prepare"
    TASK_CPUS: float = Field(1.0, ge=0)  # CPUs Ray reserves for one such job (it waits PENDING until free)
    MAX_PENDING_SAMPLES_PER_TENANT: int = Field(2, ge=1)  # queued or running sample requests; more get 429
    MAX_PENDING_DATASETS_PER_TENANT: int = Field(2, ge=1)  # queued or running dataset preparations; more get 429
    # Where jobs run: "ray-jobs" submits to one Ray cluster's Jobs API, "kuberay" creates a RayJob per job.
    CLUSTER_BACKEND: Literal["ray-jobs", "kuberay"] = "ray-jobs"
    KUBERAY_NAMESPACE: str = "rcm"  # namespace of the RayJobs (the control plane's own; RBAC is namespaced)
    KUBERAY_IMAGE: str = "rcm-ray:0.1.0"  # image of every Ray pod (deploy/docker/ray.Dockerfile)
    KUBERAY_S3_SECRET: str = "rcm-s3"  # Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for the Ray pods
    KUBERAY_GPUS_PER_POD: int = 8  # at most this many GPU workers share a Ray worker pod (GPUs per node)
    KUBERAY_CPUS_PER_WORKER: int = 8  # CPU cores per Ray Train worker
    KUBERAY_MEMORY_GI_PER_WORKER: int = 64  # GiB of memory per Ray Train worker
    KUBERAY_ACTIVE_DEADLINE_S: int = 7 * 24 * 3600  # a job's time limit unless its spec sets one
    KUBERAY_CANCEL_POLICY: Literal["delete", "suspend"] = "delete"  # what stops a RayJob after the grace period

    # -- Request handling limits (per API process: with N replicas a tenant gets N times each) ---------------
    # Job store connections: a request holds one for its duration, an event stream only per poll. A request
    # that cannot get one within DB_POOL_TIMEOUT_S gets 503 + Retry-After instead of queueing without end.
    DB_POOL_SIZE: int = Field(10, ge=1)
    DB_MAX_OVERFLOW: int = Field(10, ge=0)
    DB_POOL_TIMEOUT_S: float = Field(5.0, gt=0)
    # Server-sent event streams (GET /v1/jobs/{id}/events): a tenant's open streams beyond the cap get 429;
    # their DB polls run on their own small thread pool so streams never starve request handling; a stream
    # ends after IDLE_S without a new event or after MAX_S in all (the client reconnects with Last-Event-ID).
    EVENT_STREAMS_PER_TENANT: int = Field(8, ge=1)
    EVENT_STREAM_DB_THREADS: int = Field(4, ge=1)
    EVENT_STREAM_POLL_S: float = Field(1.0, gt=0)
    EVENT_STREAM_IDLE_S: float = Field(600.0, gt=0)
    EVENT_STREAM_MAX_S: float = Field(3600.0, gt=0)
    # Token bucket per tenant over every authenticated request: RATE_LIMIT_PER_S sustained, bursts of
    # RATE_LIMIT_BURST; beyond it 429 + Retry-After.
    RATE_LIMIT_PER_S: float = Field(20.0, gt=0)
    RATE_LIMIT_BURST: int = Field(100, ge=1)
    # Largest resources.num_workers a job may ask for (422 at submission above it): a job the cluster can
    # never place would otherwise wait for workers forever. Set it to the cluster's schedulable workers.
    MAX_WORKERS_PER_JOB: int = Field(16, ge=1, le=256)

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        if self.ENVIRONMENT == "production":
            for name in ("S3_ACCESS_KEY", "S3_SECRET_KEY"):
                if getattr(self, name).lower() in _PLACEHOLDERS:
                    raise ValueError(f"{name} is a placeholder; set a real secret in production")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]  # secrets come from the environment
