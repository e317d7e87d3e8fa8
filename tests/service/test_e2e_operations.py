"""Operations on the real stack (issue 15, findings 4, 9 and 10): a Ray head restart mid-job, admission
control with a cluster-wide limit of one job, and a job whose workers cannot be placed. One stack on free ports
(tests/service/realstack.py) with small limits: MAX_ACTIVE_JOBS=1, START_TIMEOUT_S=90, MAX_RESUBMITS=2."""

import os
import signal
import time

import httpx
import pytest

from rcm_client import RcmClient
from tests.service.realstack import running_stack, train_small_teacher

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    data = tmp_path_factory.mktemp("ops")
    limits = {"MAX_ACTIVE_JOBS": "1", "START_TIMEOUT_S": str(START_TIMEOUT_S), "MAX_RESUBMITS": "2"}
    with running_stack(data, **limits) as st:
        client = RcmClient(st.api, st.tokens["demo"])
        teacher = client.upload(train_small_teacher(data / "t"), "teacher.safetensors")["uri"]
        yield st, client, teacher


def _spec(teacher, name, steps, **extra):
    schedule = {"steps": steps, "batch_size": 64, "checkpoint_every": 20, "log_every": 5, "eval_every": 10**6}
    return {"name": name, "teacher": {"uri": teacher}, "schedule": schedule, **extra}


def _wait(client, job_id, pred, timeout):
    deadline, job = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            job = client.job(job_id)
            if pred(job):
                return job
        except httpx.TransportError:
            pass
        time.sleep(1)
    pytest.fail(f"timed out after {timeout}s waiting on job {job_id}: {job}")


def _state_times(client, job_id):
    return [(e["data"]["state"], e["created_at"]) for e in client.events(job_id) if e["kind"] == "state"]


def test_ray_head_restart_mid_job_resubmits_and_resumes_from_the_checkpoint(ops):
    st, client, teacher = ops
    job = client.submit(_spec(teacher, "ops-head-restart", 200))
    _wait(client, job["id"], lambda j: j["state"] == "RUNNING" and j["step"] >= 45, timeout=300)
    assert [c["step"] for c in client.checkpoints(job["id"])][-1] >= 40
    os.killpg(st.pid("ray"), signal.SIGKILL)  # the whole head node dies: GCS, raylet, driver, workers
    time.sleep(3)
    up = st.cmd("up")  # starts Ray again (empty job table), on the same ports
    assert up.returncode == 0, up.stdout + up.stderr
    done = _wait(client, job["id"], lambda j: j["state"] in ("SUCCEEDED", "FAILED", "CANCELLED"), timeout=400)
    assert done["state"] == "SUCCEEDED", done["failure_reason"]
    assert done["step"] == 200 and done["recovery_count"] >= 1  # resumed from a checkpoint, not from step 0
    resubmits = [e for e in client.events(job["id"]) if e["kind"] == "resubmit"]
    assert len(resubmits) == 1 and resubmits[0]["data"]["reason"] == "cluster lost the job"
    ckpts = client.checkpoints(job["id"])
    assert ckpts[-1]["step"] == 200 and all(c["step"] % 20 == 0 for c in ckpts)


def test_jobs_beyond_the_cluster_limit_wait_queued_and_start_in_order(ops):
    st, client, teacher = ops
    first = client.submit(_spec(teacher, "ops-first", 20))
    second = client.submit(_spec(teacher, "ops-second", 20))
    _wait(client, first["id"], lambda j: j["state"] in ("STARTING", "RUNNING"), timeout=60)
    assert client.job(second["id"])["state"] == "QUEUED"  # MAX_ACTIVE_JOBS=1
    done = _wait(client, first["id"], lambda j: j["state"] == "SUCCEEDED", timeout=300)
    assert done["state"] == "SUCCEEDED"
    _wait(client, second["id"], lambda j: j["state"] == "SUCCEEDED", timeout=300)
    first_end = dict(_state_times(client, first["id"]))["SUCCEEDED"]
    second_start = dict(_state_times(client, second["id"]))["STARTING"]
    assert second_start >= first_end  # handed to Ray only once the first had finished


def test_job_that_cannot_be_scheduled_fails_after_the_start_timeout(ops):
    """Three workers of one CPU each on a 2-CPU Ray head: Ray Train waits for them forever."""
    st, client, teacher = ops
    spec = _spec(teacher, "ops-too-big", 20, resources={"num_workers": 3, "fsdp_degree": 3})
    spec["schedule"]["batch_size"] = 63
    start = time.monotonic()
    job = client.submit(spec)
    done = _wait(client, job["id"], lambda j: j["state"] in ("SUCCEEDED", "FAILED"), timeout=START_TIMEOUT_S + 120)
    assert done["state"] == "FAILED" and f"not started within {START_TIMEOUT_S} s" in done["failure_reason"]
    assert "num_workers" in done["failure_reason"] and time.monotonic() - start >= START_TIMEOUT_S
    ray_job = httpx.get(f"{st.ray}/api/jobs/rcm-{job['id']}").json()
    deadline = time.monotonic() + 60
    while ray_job["status"] not in ("STOPPED", "FAILED") and time.monotonic() < deadline:
        time.sleep(2)
        ray_job = httpx.get(f"{st.ray}/api/jobs/rcm-{job['id']}").json()
    assert ray_job["status"] in ("STOPPED", "FAILED")  # and Ray no longer holds on to it
