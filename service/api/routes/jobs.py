"""/v1/jobs: submit, list, read, cancel, checkpoints (events: service/api/routes/events.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from service import crud
from service.api.deps import ClusterDep, SessionDep, TenantDep
from service.api.errors import error_responses, validation_error
from service.datasets import MAX_MANIFEST_BYTES, dataset_errors, manifest_key
from service.db import Job
from service.inputs import input_errors
from service.schemas import (
    TERMINAL_STATES,
    CheckpointPublic,
    JobCreate,
    JobPublic,
    JobsPublic,
    JobState,
    is_teacher_folder,
)
from service.settings import get_settings
from service.teachers import CONFIG_NAME, MAX_CONFIG_BYTES, folder_key, parse_config, teacher_errors

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _public(job: Job, cluster: ClusterDep, session: Session) -> JobPublic:
    return JobPublic(
        id=job.id,
        name=job.name,
        state=JobState(job.state),
        step=job.step,
        total_steps=job.total_steps,
        metrics=job.metrics or {},
        mlflow_run_url=cluster.run_url(job.mlflow_run_id) if job.mlflow_run_id else None,
        failure_reason=job.failure_reason,
        recovery_count=job.recovery_count,
        created_at=job.created_at,
        updated_at=job.updated_at,
        spec=job.spec,
        effective_config=crud.effective_config(session, job.id),
    )


def job_or_404(session: Session, tenant: str, job_id: str) -> Job:
    job = crud.get_job(session, tenant, job_id)
    if job is None:
        shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."  # never echo a long path back
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {shown} not found")
    return job


IDEMPOTENCY_KEY_DOC = (
    "Makes retries safe: a request with a key this tenant already used returns that job (200) instead of "
    "creating another, also when the requests arrive concurrently. The key is bound to the job spec: the same "
    "key with a different spec is refused with 422 (loc: header, idempotency-key)."
)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "Idempotent retry: the job this key created first"},
        **error_responses(400, 401, 413, 429, 503),
    },
)
def create_job(
    spec: JobCreate,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    cluster: ClusterDep,
    idempotency_key: Annotated[str | None, Header(max_length=128, description=IDEMPOTENCY_KEY_DOC)] = None,
) -> JobPublic:
    """Queue a distillation job (202); with an Idempotency-Key used before, the job it created first (200)."""
    errors = input_errors(spec, tenant, get_settings())
    if errors:  # an object outside the caller's input prefix: refused before anything reads it
        raise RequestValidationError(errors)
    if is_teacher_folder(spec.teacher.uri):  # a diffusers transformer: its config.json must fit the job
        bucket, prefix = folder_key(spec.teacher.uri)
        files = {o["key"].removeprefix(prefix) for o in cluster.list_inputs(bucket, prefix)}
        raw = cluster.read_input(bucket, prefix + CONFIG_NAME, MAX_CONFIG_BYTES) if CONFIG_NAME in files else None
        errors = teacher_errors(spec, raw, files)
        if not errors and spec.data.uri is not None:  # a stored dataset (its prefix checked above): its manifest
            manifest = cluster.read_input(*manifest_key(spec.data.uri), MAX_MANIFEST_BYTES)
            errors = dataset_errors(spec, manifest, parse_config(raw or b"") or {})
        if errors:
            raise RequestValidationError(errors)
    cap = get_settings().MAX_WORKERS_PER_JOB
    if spec.resources.num_workers > cap:  # a deployment setting, so checked here rather than in the schema
        raise validation_error(
            ("body", "resources", "num_workers"),
            f"Input should be less than or equal to {cap} (the most workers this deployment gives one job)",
            "less_than_equal",
        )
    try:
        job, created = crud.create_job(session, tenant, spec, idempotency_key)
    except crud.IdempotencyKeyReused:
        raise validation_error(
            ("header", "idempotency-key"),
            "this Idempotency-Key was already used with a different job spec",
            "idempotency_key_reused",
        ) from None
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return _public(job, cluster, session)


@router.get("", response_model=JobsPublic, responses=error_responses(401, 429, 503))
def read_jobs(
    session: SessionDep,
    tenant: TenantDep,
    cluster: ClusterDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=256, description="`next_cursor` of the previous page")] = None,
) -> JobsPublic:
    """This tenant's jobs, newest first; pass `next_cursor` back as `cursor` for the next page."""
    try:
        jobs, next_cursor = crud.list_jobs(session, tenant, state=state, limit=limit, cursor=cursor)
    except (ValueError, TypeError):
        raise validation_error(("query", "cursor"), "malformed cursor: pass back a next_cursor unchanged") from None
    return JobsPublic(data=[_public(j, cluster, session) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(401, 404, 429, 503))
def read_job(job_id: str, session: SessionDep, tenant: TenantDep, cluster: ClusterDep) -> JobPublic:
    """State, progress, latest metrics, MLflow run URL, failure reason and recovery count."""
    return _public(job_or_404(session, tenant, job_id), cluster, session)


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    responses=error_responses(401, 404, 409, 429, 503),
)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep, cluster: ClusterDep) -> JobPublic:
    """Graceful cancel: the worker writes a final checkpoint, then the job becomes CANCELLED."""
    job = job_or_404(session, tenant, job_id)
    if JobState(job.state) in TERMINAL_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is already {job.state}")
    if job.state != JobState.CANCELLING:
        if job.ray_submission_id is not None:
            cluster.request_cancel(job.id)
        crud.set_state(session, job, JobState.CANCELLING)
        session.commit()
    return _public(job, cluster, session)


@router.get(
    "/{job_id}/checkpoints", response_model=list[CheckpointPublic], responses=error_responses(401, 404, 429, 503)
)
def read_checkpoints(
    job_id: str, session: SessionDep, tenant: TenantDep, cluster: ClusterDep
) -> list[CheckpointPublic]:
    """Complete checkpoints in object storage, oldest first (503 while object storage is unreachable)."""
    job = job_or_404(session, tenant, job_id)
    return [CheckpointPublic(**c) for c in cluster.checkpoints(job.id)]
