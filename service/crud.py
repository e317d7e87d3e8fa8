"""Database operations on tokens, jobs and job events."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import ApiToken, Job, JobEvent
from service.inputs import TENANT_NAME
from service.schemas import JobCreate, JobState


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, tenant: str) -> str:
    """A new random token for `tenant`; only its hash is stored, the token is returned once.

    Raises:
        ValueError: the tenant name is not 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit
            (it names the tenant's S3 input prefix, so it must be one path segment).
    """
    if not TENANT_NAME.match(tenant):
        raise ValueError(
            f"tenant name {tenant!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    token = "rcm_" + secrets.token_urlsafe(32)
    session.add(ApiToken(tenant=tenant, token_sha256=hash_token(token)))
    session.commit()
    return token


def tenant_for_token(session: Session, token: str) -> str | None:
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == hash_token(token)))
    return row.tenant if row else None


def add_event(session: Session, job_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, data=data or {}))


class IdempotencyKeyReused(Exception):
    """The tenant already used this Idempotency-Key for a request with a different job spec."""


def spec_sha256(spec: JobCreate | dict[str, Any]) -> str:
    """Hash of the canonical job spec (defaults filled in, keys sorted): equal for requests that mean the same job."""
    data = spec.model_dump(mode="json") if isinstance(spec, JobCreate) else spec
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _job_for_key(session: Session, tenant: str, key: str, digest: str) -> Job | None:
    job = session.scalar(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key))
    if job is not None and (job.request_sha256 or spec_sha256(job.spec)) != digest:  # rows from before 0002: hash
        raise IdempotencyKeyReused(key)
    return job


def create_job(session: Session, tenant: str, spec: JobCreate, idempotency_key: str | None) -> tuple[Job, bool]:
    """Insert a QUEUED job; with an idempotency key already used by this tenant, return that job instead.

    Concurrent requests with one key race on the unique (tenant, idempotency_key) constraint: the loser
    rolls back and returns the winner's job. Raises IdempotencyKeyReused if the key's job has another spec.
    """
    digest = spec_sha256(spec) if idempotency_key else None
    if idempotency_key and digest:
        existing = _job_for_key(session, tenant, idempotency_key, digest)
        if existing:
            return existing, False
    job = Job(
        id=str(uuid.uuid4()),
        tenant=tenant,
        name=spec.name,
        state=JobState.QUEUED,
        # only what the user set: the task's preset supplies the rest (the job's effective_config shows it)
        spec=spec.model_dump(mode="json", exclude_unset=True),
        idempotency_key=idempotency_key,
        request_sha256=digest,
        step=0,
        total_steps=spec.schedule.steps or 0,  # 0 until the effective config (the preset's steps) is known
        metrics={},
        recovery_count=0,
    )
    session.add(job)
    add_event(session, job.id, "state", {"state": JobState.QUEUED})
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        winner = _job_for_key(session, tenant, idempotency_key, digest) if idempotency_key and digest else None
        if winner is None:
            raise
        return winner, False
    return job, True


def get_job(session: Session, tenant: str, job_id: str) -> Job | None:
    job = session.get(Job, job_id)
    return job if job is not None and job.tenant == tenant else None  # other tenants' jobs do not exist


def set_state(session: Session, job: Job, state: JobState, **data: Any) -> None:
    if job.state != state:
        job.state = state
        add_event(session, job.id, "state", {"state": state, **data})


def _encode_cursor(created_at: dt.datetime, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), job_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    """Raises ValueError for a malformed cursor: anything `_encode_cursor` could not have written."""
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except RecursionError:  # deeply nested JSON: json's C decoder recurses once per level
        raise ValueError("malformed cursor") from None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise ValueError("malformed cursor")
    created = dt.datetime.fromisoformat(value[0])
    if created.tzinfo is not None:  # the store keeps naive UTC
        created = created.astimezone(dt.UTC).replace(tzinfo=None)
    return created, value[1]


def list_jobs(
    session: Session, tenant: str, *, state: JobState | None, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """Newest first, keyset-paginated on (created_at, id)."""
    q = select(Job).where(Job.tenant == tenant)
    if state:
        q = q.where(Job.state == state)
    if cursor:
        created, job_id = decode_cursor(cursor)
        q = q.where((Job.created_at < created) | ((Job.created_at == created) & (Job.id < job_id)))
    rows = list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = _encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor


def events_after(session: Session, job_id: str, after_id: int = 0, limit: int | None = None) -> list[JobEvent]:
    q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id)
    return list(session.scalars(q.limit(limit) if limit is not None else q))


def active_jobs(session: Session) -> list[Job]:
    """Jobs not yet terminal, oldest first (the admission order)."""
    terminal = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
    q = select(Job).where(Job.state.not_in(terminal)).order_by(Job.created_at, Job.id)
    return list(session.scalars(q))


def events_of_kind(session: Session, job_id: str, kind: str) -> list[JobEvent]:
    q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == kind).order_by(JobEvent.id)
    return list(session.scalars(q))


def state_since(session: Session, job_id: str) -> dt.datetime:
    """When the job entered its current state (its latest state event)."""
    q = select(JobEvent.created_at).where(JobEvent.job_id == job_id, JobEvent.kind == "state")
    return session.scalars(q.order_by(JobEvent.id.desc()).limit(1)).one()


def effective_config(session: Session, job_id: str) -> dict[str, Any] | None:
    """The settings the worker resolved for the job (the latest "effective_config" event), None before."""
    row = session.scalar(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.kind == "effective_config")
        .order_by(JobEvent.id.desc())
        .limit(1)
    )
    return row.data if row else None
