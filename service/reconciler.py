"""Keeps stored job state in line with Ray (job status) and MLflow (progress metrics).

Runs in a background thread of the API process. All state lives in the database, so a restarted API
picks up where it left off: QUEUED jobs are (re)submitted, running ones are followed to the end.

Admission control: at most `Limits.max_active_jobs` jobs are on the cluster at once (STARTING, RUNNING or
CANCELLING), at most `max_active_per_tenant` of one tenant; the others wait QUEUED and start first in, first
out (a tenant at its own limit does not hold up the others). A job whose workers have not started
`start_timeout_s` after submission (no capacity for them, e.g. more workers than the cluster has CPUs or GPUs)
is stopped and FAILED with that reason. A job the cluster no longer knows (LOST: the Ray head restarted and
lost its job table, or the RayJob was deleted behind the API's back) is resubmitted up to `max_resubmits`
times; the worker resumes from its last complete checkpoint (same Ray Train run name and storage path). Past
that it is FAILED ("the cluster lost the job"); a lost job that was being cancelled ends CANCELLED.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from dataclasses import dataclass

import httpx
from sqlalchemy.orm import Session, sessionmaker

from service import crud
from service.cluster import LOST, RAY_TERMINAL, Cluster
from service.db import Job, utcnow
from service.schemas import JobCreate, JobState

log = logging.getLogger(__name__)
CANCEL_GRACE_S = 120.0  # a cancelled job that has not stopped by itself after this is stopped through Ray
PROGRESS_KEYS = ("step", "loss", "scm_loss", "dmd_loss", "fake_score_loss", "recovery_count")


@dataclass(frozen=True)
class Limits:
    """The reconciler's policy knobs (Settings: MAX_ACTIVE_JOBS, MAX_ACTIVE_JOBS_PER_TENANT, START_TIMEOUT_S,
    MAX_RESUBMITS)."""

    max_active_jobs: int = 4
    max_active_per_tenant: int = 2
    start_timeout_s: float = 1800.0
    max_resubmits: int = 2


def _submit(session: Session, cluster: Cluster, job: Job) -> None:
    try:
        if job.mlflow_run_id is None:
            experiment = JobCreate.model_validate(job.spec).tracking.experiment  # stored: only what was set
            job.mlflow_run_id = cluster.create_run(experiment, job.id, job.name)
        job.ray_submission_id = cluster.submit(job.id, job.spec, job.mlflow_run_id)
    except httpx.HTTPError as exc:
        reason = f"cluster unavailable: {type(exc).__name__}"
        last = crud.events_after(session, job.id)[-1]
        if last.kind != "submit_retry" or last.data.get("reason") != reason:
            crud.add_event(session, job.id, "submit_retry", {"reason": reason})
        return
    crud.set_state(session, job, JobState.STARTING, submission_id=job.ray_submission_id)


def _started(session: Session, job: Job, progress: dict[str, float | None]) -> bool:
    """Whether the job's workers have started since its last (re)submission: the worker logs `step` and
    `recovery_count` to MLflow once its networks are built (step 0), then at every log step."""
    resubmits = crud.events_of_kind(session, job.id, "resubmit")
    if not resubmits:
        return "recovery_count" in progress or job.step > 0
    before = resubmits[-1].data
    recoveries = progress.get("recovery_count") or 0
    return recoveries > before.get("recovery_count", 0) or job.step > before.get("step", 0)


def _finish(session: Session, cluster: Cluster, job: Job, state: JobState, reason: str | None) -> None:
    if state == JobState.FAILED:
        job.failure_reason = reason
    crud.set_state(session, job, state, **({"reason": reason} if reason else {}))
    if job.mlflow_run_id:  # MLflow never ends a crashed run by itself; the owner of the job does
        run_status = {JobState.SUCCEEDED: "FINISHED", JobState.CANCELLED: "KILLED"}.get(state, "FAILED")
        cluster.set_run_status(job.mlflow_run_id, run_status)


def _lost(session: Session, cluster: Cluster, job: Job, limits: Limits) -> None:
    """The cluster no longer knows the job: cancelled if that was asked for, else resubmitted (bounded)."""
    if job.state == JobState.CANCELLING:
        _finish(session, cluster, job, JobState.CANCELLED, "the cluster lost the job while it was being cancelled")
        return
    attempts = len(crud.events_of_kind(session, job.id, "resubmit"))
    if attempts >= limits.max_resubmits:
        _finish(session, cluster, job, JobState.FAILED, f"cluster lost the job (after {attempts} resubmission(s))")
        return
    crud.add_event(
        session,
        job.id,
        "resubmit",
        {
            "attempt": attempts + 1,
            "reason": "cluster lost the job",
            "step": job.step,
            "recovery_count": job.recovery_count,
        },
    )
    job.ray_submission_id = cluster.submit(job.id, job.spec, job.mlflow_run_id or "")
    crud.set_state(session, job, JobState.STARTING, reason="resubmitted: cluster lost the job")


def _follow(session: Session, cluster: Cluster, job: Job, limits: Limits) -> None:
    assert job.ray_submission_id is not None
    status = cluster.status(job.ray_submission_id)
    if status.status == LOST:
        _lost(session, cluster, job, limits)
        return
    if crud.effective_config(session, job.id) is None and (effective := cluster.effective_config(job.id)):
        crud.add_event(session, job.id, "effective_config", effective)
        job.total_steps = int(effective.get("schedule", {}).get("steps", job.total_steps))
    progress: dict[str, float | None] = {}
    if job.mlflow_run_id:
        # NaN/inf become null: PostgreSQL's json type refuses NaN, and JobPublic.metrics documents null for them.
        progress = {
            k: v if math.isfinite(v) else None
            for k, v in cluster.run_progress(job.mlflow_run_id).items()
            if k in PROGRESS_KEYS
        }
        step = int(progress["step"]) if progress.get("step") is not None else job.step
        if step != job.step:
            crud.add_event(session, job.id, "progress", {"step": step, **progress})
        job.step, job.metrics = step, progress
        recoveries = progress.get("recovery_count")
        job.recovery_count = int(recoveries) if recoveries is not None else job.recovery_count
    if job.state == JobState.STARTING and status.status not in RAY_TERMINAL:
        if status.status == "RUNNING" and _started(session, job, progress):
            crud.set_state(session, job, JobState.RUNNING)
        elif (utcnow() - crud.state_since(session, job.id)).total_seconds() > limits.start_timeout_s:
            cluster.stop(job.ray_submission_id)
            res = JobCreate.model_validate(job.spec).resources  # stored: only what was set; defaults filled here
            reason = (
                f"not started within {limits.start_timeout_s:.0f} s: the cluster could not place the job's "
                f"{res.num_workers} worker(s) (resources.num_workers, use_gpu={res.use_gpu}); "
                "ask for fewer workers or retry when the cluster has capacity"
            )
            _finish(session, cluster, job, JobState.FAILED, reason)
            return
    if status.status not in RAY_TERMINAL:
        if job.state == JobState.CANCELLING and (utcnow() - job.updated_at).total_seconds() > CANCEL_GRACE_S:
            cluster.stop(job.ray_submission_id)
        return
    if status.status == "SUCCEEDED":
        final = JobState.CANCELLED if job.state == JobState.CANCELLING else JobState.SUCCEEDED
        crud.set_state(session, job, final)
        run_status = "KILLED" if final == JobState.CANCELLED else "FINISHED"
    elif status.status == "STOPPED":
        crud.set_state(session, job, JobState.CANCELLED, reason="stopped through Ray")
        run_status = "KILLED"
    else:
        job.failure_reason = (status.message or "the worker failed")[-2000:]
        crud.set_state(session, job, JobState.FAILED, reason=job.failure_reason)
        run_status = "FAILED"
    if job.mlflow_run_id:  # MLflow never ends a crashed run by itself; the owner of the job does
        cluster.set_run_status(job.mlflow_run_id, run_status)


def reconcile_once(session: Session, cluster: Cluster, limits: Limits = Limits()) -> None:
    """One pass: follow every job on the cluster, then admit QUEUED jobs first in, first out within the limits."""
    jobs = crud.active_jobs(session)  # oldest first
    for job in (j for j in jobs if j.ray_submission_id is not None):
        _guarded(session, job, lambda job=job: _follow(session, cluster, job, limits))
    on_cluster = [j for j in jobs if j.ray_submission_id is not None and JobState(j.state) in ACTIVE]
    total, per_tenant = len(on_cluster), Counter(j.tenant for j in on_cluster)
    for job in (j for j in jobs if j.ray_submission_id is None):
        if job.state == JobState.CANCELLING:
            _guarded(
                session,
                job,
                lambda job=job: crud.set_state(session, job, JobState.CANCELLED, reason="cancelled before it started"),
            )
            continue
        if total >= limits.max_active_jobs:
            continue  # strict FIFO: a freed slot goes to the oldest waiting job (later ones may still be cancelled)
        if per_tenant[job.tenant] >= limits.max_active_per_tenant:
            continue  # this tenant waits; later jobs of other tenants may start
        _guarded(session, job, lambda job=job: _submit(session, cluster, job))
        if job.ray_submission_id is not None:
            total, per_tenant[job.tenant] = total + 1, per_tenant[job.tenant] + 1


ACTIVE = (JobState.STARTING, JobState.RUNNING, JobState.CANCELLING)


def _guarded(session: Session, job: Job, action) -> None:
    """Run one job's step and commit it; an unreachable cluster keeps the stored state for the next pass."""
    try:
        action()
        session.commit()
    except httpx.HTTPError as exc:
        session.rollback()
        log.warning("reconcile %s: %s", job.id, exc)


class Reconciler:
    def __init__(self, make_session: sessionmaker, cluster: Cluster, interval_s: float, limits: Limits = Limits()):
        self.make_session, self.cluster, self.interval_s, self.limits = make_session, cluster, interval_s, limits
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.make_session() as session:
                    reconcile_once(session, self.cluster, self.limits)
            except Exception:  # noqa: BLE001  (the loop must survive anything; the error is logged)
                log.exception("reconciler pass failed")
            self._stop.wait(self.interval_s)
