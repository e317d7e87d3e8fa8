"""Keeps stored job state in line with Ray (job status) and MLflow (progress metrics).

Runs in a background thread of the API process. All state lives in the database, so a restarted API
picks up where it left off: QUEUED jobs are (re)submitted, running ones are followed to the end.
"""

from __future__ import annotations

import logging
import math
import threading

import httpx
from sqlalchemy.orm import Session, sessionmaker

from service import crud
from service.cluster import RAY_TERMINAL, Cluster
from service.db import Job, utcnow
from service.schemas import JobState

log = logging.getLogger(__name__)
CANCEL_GRACE_S = 120.0  # a cancelled job that has not stopped by itself after this is stopped through Ray
PROGRESS_KEYS = ("step", "loss", "scm_loss", "dmd_loss", "fake_score_loss", "recovery_count")


def _submit(session: Session, cluster: Cluster, job: Job) -> None:
    try:
        if job.mlflow_run_id is None:
            job.mlflow_run_id = cluster.create_run(job.spec["tracking"]["experiment"], job.id, job.name)
        job.ray_submission_id = cluster.submit(job.id, job.spec, job.mlflow_run_id)
    except httpx.HTTPError as exc:
        reason = f"cluster unavailable: {type(exc).__name__}"
        last = crud.events_after(session, job.id)[-1]
        if last.kind != "submit_retry" or last.data.get("reason") != reason:
            crud.add_event(session, job.id, "submit_retry", {"reason": reason})
        return
    crud.set_state(session, job, JobState.STARTING, submission_id=job.ray_submission_id)


def _follow(session: Session, cluster: Cluster, job: Job) -> None:
    assert job.ray_submission_id is not None
    status = cluster.status(job.ray_submission_id)
    if job.mlflow_run_id:
        # NaN/inf become null: PostgreSQL's json type refuses NaN, and JobPublic.metrics documents null for them.
        progress: dict[str, float | None] = {
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
    if status.status == "RUNNING" and job.state == JobState.STARTING and job.step > 0:
        crud.set_state(session, job, JobState.RUNNING)
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


def reconcile_once(session: Session, cluster: Cluster) -> None:
    for job in crud.active_jobs(session):
        try:
            if job.ray_submission_id is None:
                if job.state == JobState.CANCELLING:
                    crud.set_state(session, job, JobState.CANCELLED, reason="cancelled before it started")
                else:
                    _submit(session, cluster, job)
            else:
                _follow(session, cluster, job)
            session.commit()
        except httpx.HTTPError as exc:  # the cluster is down: keep the stored state, try again later
            session.rollback()
            log.warning("reconcile %s: %s", job.id, exc)


class Reconciler:
    def __init__(self, make_session: sessionmaker, cluster: Cluster, interval_s: float):
        self.make_session, self.cluster, self.interval_s = make_session, cluster, interval_s
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
                    reconcile_once(session, self.cluster)
            except Exception:  # noqa: BLE001  (the loop must survive anything; the error is logged)
                log.exception("reconciler pass failed")
            self._stop.wait(self.interval_s)
