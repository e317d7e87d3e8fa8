"""The reconciler's operations policy (issue 15, findings 4, 9 and 10) on a real SQLite job store with the
fake cluster: admission control (cluster-wide and per-tenant limits, FIFO), the start timeout of jobs whose
workers cannot be placed, and jobs the cluster lost (resubmitted with a bound, cancelled when cancelling)."""

import datetime as dt

import httpx
import pytest

from service import crud
from service.cluster import RayCluster
from service.db import make_engine, make_sessionmaker, run_migrations
from service.reconciler import Limits, reconcile_once
from service.schemas import JobCreate, JobState
from service.settings import Settings
from tests.service.fakes import FakeCluster

SPEC = JobCreate.model_validate({"name": "r", "teacher": {"uri": "builtin:toy2d"}, "schedule": {"steps": 10}})


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'rcm.db'}"
    run_migrations(url)
    with make_sessionmaker(make_engine(url))() as session:
        yield session, FakeCluster()


def _jobs(session, *tenants):
    return [crud.create_job(session, t, SPEC, None)[0] for t in tenants]


def _states(session, jobs):
    for j in jobs:
        session.refresh(j)
    return [j.state for j in jobs]


def test_admission_cluster_limit_keeps_jobs_queued_in_fifo_order(store):
    session, cluster = store
    limits = Limits(max_active_jobs=2, max_active_per_tenant=2)
    jobs = _jobs(session, "a", "b", "c", "d")
    reconcile_once(session, cluster, limits)
    assert _states(session, jobs) == ["STARTING", "STARTING", "QUEUED", "QUEUED"]
    assert cluster.submitted == [jobs[0].id, jobs[1].id]
    reconcile_once(session, cluster, limits)  # nothing finished: nothing more starts
    assert len(cluster.submitted) == 2
    cluster.ray_status[jobs[1].ray_submission_id].status = "SUCCEEDED"
    reconcile_once(session, cluster, limits)  # one slot: the oldest waiting job, not the newest
    assert _states(session, jobs) == ["STARTING", "SUCCEEDED", "STARTING", "QUEUED"]
    cluster.ray_status[jobs[0].ray_submission_id].status = "FAILED"
    reconcile_once(session, cluster, limits)
    assert _states(session, jobs) == ["FAILED", "SUCCEEDED", "STARTING", "STARTING"]
    assert cluster.submitted == [j.id for j in jobs]


def test_admission_per_tenant_limit_does_not_hold_up_other_tenants(store):
    session, cluster = store
    limits = Limits(max_active_jobs=10, max_active_per_tenant=1)
    jobs = _jobs(session, "a", "a", "a", "b")
    reconcile_once(session, cluster, limits)
    assert _states(session, jobs) == ["STARTING", "QUEUED", "QUEUED", "STARTING"]
    cluster.ray_status[jobs[0].ray_submission_id].status = "SUCCEEDED"
    reconcile_once(session, cluster, limits)
    assert _states(session, jobs) == ["SUCCEEDED", "STARTING", "QUEUED", "STARTING"]  # tenant a's next, in order


def test_cancel_of_a_queued_job_waiting_for_a_slot_ends_cancelled(store):
    session, cluster = store
    limits = Limits(max_active_jobs=1)
    running, first, second = _jobs(session, "a", "b", "c")
    reconcile_once(session, cluster, limits)
    crud.set_state(session, second, JobState.CANCELLING)  # behind another waiting job
    session.commit()
    reconcile_once(session, cluster, limits)
    assert _states(session, [running, first, second]) == ["STARTING", "QUEUED", "CANCELLED"]
    assert cluster.submitted == [running.id]


def _age_state(session, job, seconds):
    """Move the job's latest state event `seconds` into the past."""
    event = crud.events_of_kind(session, job.id, "state")[-1]
    event.created_at -= dt.timedelta(seconds=seconds)
    session.commit()


def test_job_whose_workers_never_start_fails_after_the_start_timeout(store):
    session, cluster = store
    limits = Limits(start_timeout_s=60)
    (job,) = _jobs(session, "a")
    reconcile_once(session, cluster, limits)
    cluster.ray_status[job.ray_submission_id].status = "RUNNING"  # Ray runs the driver; the workers wait
    reconcile_once(session, cluster, limits)
    assert _states(session, [job]) == ["STARTING"]
    _age_state(session, job, 61)
    reconcile_once(session, cluster, limits)
    assert _states(session, [job]) == ["FAILED"]
    assert "not started within 60 s" in job.failure_reason and "num_workers" in job.failure_reason
    assert cluster.stopped == [job.ray_submission_id] and cluster.run_statuses[job.mlflow_run_id] == "FAILED"


def test_job_whose_workers_started_is_running_and_never_times_out(store):
    session, cluster = store
    limits = Limits(start_timeout_s=60)
    (job,) = _jobs(session, "a")
    reconcile_once(session, cluster, limits)
    cluster.ray_status[job.ray_submission_id].status = "RUNNING"
    cluster.progress[job.mlflow_run_id] = {"step": 0.0, "recovery_count": 0.0}  # logged when the workers start
    reconcile_once(session, cluster, limits)
    _age_state(session, job, 3600)
    reconcile_once(session, cluster, limits)
    assert _states(session, [job]) == ["RUNNING"] and cluster.stopped == []


def test_lost_job_is_resubmitted_then_failed_after_the_bound(store):
    session, cluster = store
    limits = Limits(max_resubmits=2)
    (job,) = _jobs(session, "a")
    reconcile_once(session, cluster, limits)
    sub = job.ray_submission_id
    cluster.ray_status[sub].status = "RUNNING"
    cluster.progress[job.mlflow_run_id] = {"step": 40.0, "recovery_count": 0.0}
    reconcile_once(session, cluster, limits)
    assert _states(session, [job]) == ["RUNNING"]
    for attempt in (1, 2):
        cluster.ray_status[sub].status = "LOST"  # the Ray head restarted: no record of the job
        reconcile_once(session, cluster, limits)
        assert _states(session, [job]) == ["STARTING"] and cluster.submitted == [job.id] * (attempt + 1)
        assert cluster.ray_status[sub].status == "PENDING"  # resubmitted under the same run (resumes in S3)
        # the resumed worker logs a higher recovery count once it has started
        cluster.ray_status[sub].status = "RUNNING"
        cluster.progress[job.mlflow_run_id] = {"step": 40.0, "recovery_count": float(attempt)}
        reconcile_once(session, cluster, limits)
        assert _states(session, [job]) == ["RUNNING"]
    cluster.ray_status[sub].status = "LOST"
    reconcile_once(session, cluster, limits)
    assert _states(session, [job]) == ["FAILED"] and "cluster lost the job" in job.failure_reason
    assert cluster.run_statuses[job.mlflow_run_id] == "FAILED" and len(cluster.submitted) == 3


def test_lost_job_that_was_being_cancelled_ends_cancelled(store):
    session, cluster = store
    (job,) = _jobs(session, "a")
    reconcile_once(session, cluster)
    crud.set_state(session, job, JobState.CANCELLING)
    session.commit()
    cluster.ray_status[job.ray_submission_id].status = "LOST"
    reconcile_once(session, cluster)
    assert _states(session, [job]) == ["CANCELLED"] and cluster.submitted == [job.id]
    assert cluster.run_statuses[job.mlflow_run_id] == "KILLED"


def test_ray_jobs_backend_reads_an_unknown_submission_as_lost():
    settings = Settings(S3_ACCESS_KEY="k", S3_SECRET_KEY="s")
    cluster = RayCluster(settings)

    def ray(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/jobs/rcm-known":
            return httpx.Response(200, json={"status": "RUNNING", "message": None})
        return httpx.Response(404, text="Job rcm-gone does not exist")

    cluster.ray = httpx.Client(base_url="http://ray", transport=httpx.MockTransport(ray))
    assert cluster.status("rcm-known").status == "RUNNING"
    assert cluster.status("rcm-gone").status == "LOST"
