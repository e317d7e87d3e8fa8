"""/v1/jobs: submit, list, read, cancel, events (JSON or server-sent events), checkpoints."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from service import crud
from service.api.deps import ClusterDep, SessionDep, TenantDep
from service.db import Job
from service.schemas import (
    TERMINAL_STATES,
    CheckpointPublic,
    JobCreate,
    JobEventPublic,
    JobPublic,
    JobsPublic,
    JobState,
)

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


def _job_or_404(session, tenant: str, job_id: str) -> Job:
    job = crud.get_job(session, tenant, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic)
def create_job(
    spec: JobCreate,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    cluster: ClusterDep,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> JobPublic:
    """Queue a distillation job; the same Idempotency-Key returns the job it created first."""
    job, created = crud.create_job(session, tenant, spec, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return _public(job, cluster, session)


@router.get("", response_model=JobsPublic)
def read_jobs(
    session: SessionDep,
    tenant: TenantDep,
    cluster: ClusterDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> JobsPublic:
    """This tenant's jobs, newest first; pass `next_cursor` back as `cursor` for the next page."""
    try:
        jobs, next_cursor = crud.list_jobs(session, tenant, state=state, limit=limit, cursor=cursor)
    except (ValueError, TypeError):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "cursor: malformed") from None
    return JobsPublic(data=[_public(j, cluster, session) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic)
def read_job(job_id: str, session: SessionDep, tenant: TenantDep, cluster: ClusterDep) -> JobPublic:
    """State, progress, latest metrics, MLflow run URL, failure reason and recovery count."""
    return _public(_job_or_404(session, tenant, job_id), cluster, session)


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep, cluster: ClusterDep) -> JobPublic:
    """Graceful cancel: the worker writes a final checkpoint, then the job becomes CANCELLED."""
    job = _job_or_404(session, tenant, job_id)
    if JobState(job.state) in TERMINAL_STATES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is already {job.state}")
    if job.state != JobState.CANCELLING:
        if job.ray_submission_id is not None:
            cluster.request_cancel(job.id)
        crud.set_state(session, job, JobState.CANCELLING)
        session.commit()
    return _public(job, cluster, session)


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointPublic])
def read_checkpoints(job_id: str, session: SessionDep, tenant: TenantDep, cluster: ClusterDep):
    """Complete checkpoints in object storage, oldest first."""
    job = _job_or_404(session, tenant, job_id)
    return [CheckpointPublic(**c) for c in cluster.checkpoints(job.id)]


@router.get("/{job_id}/events", response_model=list[JobEventPublic])
async def read_events(job_id: str, request: Request, session: SessionDep, tenant: TenantDep):
    """The job's history; with `Accept: text/event-stream`, history then live events until the job ends."""
    job = _job_or_404(session, tenant, job_id)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return [JobEventPublic.model_validate(e, from_attributes=True) for e in crud.events_after(session, job.id)]
    make_session = request.app.state.sessionmaker

    async def stream():
        last = 0
        while True:
            with make_session() as s:
                events = crud.events_after(s, job_id, last)
                current = s.get(Job, job_id)
                done = current is None or JobState(current.state) in TERMINAL_STATES
            for e in events:
                last = e.id
                payload = JobEventPublic.model_validate(e, from_attributes=True).model_dump(mode="json")
                yield f"id: {e.id}\nevent: {e.kind}\ndata: {json.dumps(payload)}\n\n"
            if done or await request.is_disconnected():
                return
            await asyncio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/event-stream")
