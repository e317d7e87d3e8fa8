"""The KubeRay backend (service/kuberay.py): RayJobs built from job specs validate against the KubeRay v1.7.0 CRD,
status objects shaped as KubeRay writes them map to the API's states, and `KubeRayCluster` drives a fake
`CustomObjectsApi` (no Kubernetes here) through submit, status, cancel and the reconciler's whole lifecycle."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException

from service import crud
from service.cluster import RayCluster
from service.db import Job, make_engine, make_sessionmaker, run_migrations
from service.kuberay import (
    KubeRayCluster,
    KubernetesUnavailable,
    build_rayjob,
    rayjob_name,
    rayjob_state,
    workers_per_pod,
)
from service.reconciler import reconcile_once
from service.schemas import JobCreate, JobState
from service.settings import Settings
from tests.deploy import checks

JOB_ID = "0b7c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d"
EXAMPLES = sorted((checks.ROOT / "examples" / "jobs").glob("*.json"))


def make_settings(**overrides) -> Settings:
    values = {"S3_ACCESS_KEY": "AKexample", "S3_SECRET_KEY": "s3-secret-never-in-a-rayjob", **overrides}
    return Settings(_env_file=None, **values)


def example_spec(raw: dict | str = "rcm-ring8.json", **extra_resources) -> dict:
    """A spec as the API stores it (validated, defaults filled); `extra_resources` are added afterwards."""
    if isinstance(raw, str):
        raw = json.loads((checks.ROOT / "examples" / "jobs" / raw).read_text())
    out = JobCreate.model_validate(raw).model_dump(mode="json")
    out["resources"].update(extra_resources)  # e.g. time_limit_s, which the schema does not have yet
    return out


SHAPES = {
    "name": "shapes-dit",
    "teacher": {"uri": "s3://ckpt/teachers/shapes.safetensors"},
    "data": {"dataset": "shapes"},
}


def gpu(num_workers: int, fsdp: int, cp: int = 1) -> dict:
    resources = {"num_workers": num_workers, "use_gpu": True, "fsdp_degree": fsdp, "cp_degree": cp}
    return {**SHAPES, "resources": resources}


# Specs of several shapes: the examples as the API stores them, then DiT jobs from 1 to 64 GPUs.
SPECS = {
    **{p.stem: (p.name, {}) for p in EXAMPLES},
    "gpu-1": (gpu(1, 1), {}),
    "gpu-8": (gpu(8, 8), {}),
    "gpu-16": (gpu(16, 16), {}),
    "gpu-64": (gpu(64, 64), {}),
    "gpu-time-limit": (gpu(2, 2), {"time_limit_s": 3600}),
}


@pytest.fixture(params=sorted(SPECS), ids=str)
def rayjob(request):
    raw, extra = SPECS[request.param]
    spec = example_spec(raw, **extra)
    return spec, build_rayjob(JOB_ID, spec, "run-1", make_settings())


def test_generated_rayjob_matches_crd(rayjob):
    _, obj = rayjob
    assert checks.custom_resource_errors(obj) == []


def test_generated_rayjob_is_sized_from_resources(rayjob):
    spec, obj = rayjob
    res, settings = spec["resources"], make_settings()
    cluster = obj["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # nothing trains on the head
    (group,) = cluster["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    per_pod = workers_per_pod(res["num_workers"], settings.KUBERAY_GPUS_PER_POD) if res["use_gpu"] else 1
    assert group["replicas"] * per_pod == res["num_workers"]
    assert group["minReplicas"] == group["maxReplicas"] == group["replicas"]  # fixed size: no autoscaling
    assert limits["cpu"] == str(per_pod * settings.KUBERAY_CPUS_PER_WORKER)
    assert limits["memory"] == f"{per_pod * settings.KUBERAY_MEMORY_GI_PER_WORKER}Gi"
    tolerations = group["template"]["spec"].get("tolerations", [])
    if res["use_gpu"]:
        assert limits["nvidia.com/gpu"] == str(per_pod) == group["rayStartParams"]["num-gpus"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    else:
        assert "nvidia.com/gpu" not in limits and not tolerations
    for template in checks.pod_templates(obj):
        (shm,) = [v for v in template["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in template["spec"]["containers"][0]["volumeMounts"]
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "rcm-ray"  # the NetworkPolicy's selector


def test_generated_rayjob_lifecycle_fields(rayjob):
    spec, obj = rayjob
    s, settings = obj["spec"], make_settings()
    assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] == "RayJob"
    assert obj["metadata"]["name"] == s["jobId"] == f"rcm-{JOB_ID}"
    assert obj["metadata"]["namespace"] == settings.KUBERAY_NAMESPACE
    assert s["entrypoint"] == settings.WORKER_ENTRYPOINT == "python -m workers.entrypoint"
    assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] > 0
    assert s["backoffLimit"] >= 1  # retries rerun the entrypoint, which resumes from the run's S3 checkpoint
    assert s["preRunningDeadlineSeconds"] > 0
    expected_limit = spec["resources"].get("time_limit_s") or settings.KUBERAY_ACTIVE_DEADLINE_S
    assert s["activeDeadlineSeconds"] == expected_limit
    assert s["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert s["submissionMode"] == "K8sJobMode"


def test_runtime_env_matches_the_ray_jobs_backend():
    """Both backends hand a job the same environment: the KubeRay one from RayCluster.submit's request body."""
    settings, spec = make_settings(), example_spec()
    sent = {}

    def handler(request: httpx.Request) -> httpx.Response:
        sent.update(json.loads(request.content))
        return httpx.Response(200, json={"submission_id": sent["submission_id"]})

    ray = RayCluster(settings)
    ray.ray = httpx.Client(base_url="http://ray", transport=httpx.MockTransport(handler))
    submission_id = ray.submit(JOB_ID, spec, "run-1")
    obj = build_rayjob(JOB_ID, spec, "run-1", settings)
    assert yaml.safe_load(obj["spec"]["runtimeEnvYAML"])["env_vars"] == sent["runtime_env"]["env_vars"]
    assert sent["entrypoint"] == obj["spec"]["entrypoint"]
    assert submission_id == obj["spec"]["jobId"]  # the same Ray submission id on either backend


def test_rayjob_carries_no_secrets(rayjob):
    _, obj = rayjob
    settings = make_settings()
    text = json.dumps(obj)
    assert settings.S3_SECRET_KEY not in text and settings.S3_ACCESS_KEY not in text
    for template in checks.pod_templates(obj):
        env = checks.container_env(template["spec"]["containers"][0])
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[var] == {"secretKeyRef": {"name": settings.KUBERAY_S3_SECRET, "key": var}}


def test_rayjob_pods_get_what_the_workers_read(rayjob):
    """The worker code's reads: per-job ones from the runtime env, the rest (S3 keys) from each pod's env."""
    _, obj = rayjob
    assert set(yaml.safe_load(obj["spec"]["runtimeEnvYAML"])["env_vars"]) == checks.per_job_env()
    for template in checks.pod_templates(obj):
        env = checks.container_env(template["spec"]["containers"][0])
        assert checks.ray_node_reads() <= env.keys()


@pytest.mark.parametrize(
    ("num_workers", "max_per_pod", "expected"), [(1, 8, 1), (8, 8, 8), (12, 8, 6), (16, 8, 8), (7, 4, 1)]
)
def test_workers_per_pod_fills_every_pod(num_workers, max_per_pod, expected):
    assert workers_per_pod(num_workers, max_per_pod) == expected


def test_rayjob_name_fits_kuberay_limits():
    assert rayjob_name(JOB_ID) == f"rcm-{JOB_ID}" and len(rayjob_name(JOB_ID)) == 40
    with pytest.raises(ValueError, match="47"):
        rayjob_name("x" * 44)


# -- status mapping, on status objects shaped as KubeRay v1.7 writes them --------------------------------------

NAME = f"rcm-{JOB_ID}"
CLUSTER = f"{NAME}-k8v2q"
BASE_STATUS = {
    "jobId": NAME,
    "rayClusterName": CLUSTER,
    "startTime": "2026-11-20T10:00:00Z",
    "observedGeneration": 1,
    "failed": 0,
    "succeeded": 0,
}
RUNNING = {
    **BASE_STATUS,
    "dashboardURL": f"{CLUSTER}-head-svc.rcm.svc.cluster.local:8265",
    "rayClusterStatus": {"state": "ready", "desiredWorkerReplicas": 2, "availableWorkerReplicas": 2},
    "rayJobInfo": {"startTime": "2026-11-20T10:03:00Z"},
}
ENDED = {
    "endTime": "2026-11-20T11:00:00Z",
    "rayJobInfo": {"startTime": "2026-11-20T10:03:00Z", "endTime": "2026-11-20T11:00:00Z"},
}
STATUS_CASES = {
    "not-yet-reconciled": (None, JobState.QUEUED, None),
    "initializing": ({**BASE_STATUS, "jobDeploymentStatus": "Initializing", "jobStatus": ""}, JobState.STARTING, None),
    "cluster-ready-job-pending": (
        {**RUNNING, "jobDeploymentStatus": "Running", "jobStatus": "PENDING"},
        JobState.STARTING,
        None,
    ),
    "running": ({**RUNNING, "jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, JobState.RUNNING, None),
    "ray-job-succeeded-submitter-finishing": (
        {**RUNNING, "jobDeploymentStatus": "Running", "jobStatus": "SUCCEEDED"},
        JobState.RUNNING,
        None,
    ),
    "ray-job-failed-may-retry": (
        {**RUNNING, "jobDeploymentStatus": "Running", "jobStatus": "FAILED"},
        JobState.RUNNING,
        None,
    ),
    "ray-job-stopped": (
        {**RUNNING, "jobDeploymentStatus": "Running", "jobStatus": "STOPPED"},
        JobState.CANCELLING,
        "stopped",
    ),
    "complete": (
        {**RUNNING, **ENDED, "jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "succeeded": 1},
        JobState.SUCCEEDED,
        None,
    ),
    "complete-stopped": (
        {**RUNNING, **ENDED, "jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"},
        JobState.CANCELLED,
        "stopped",
    ),
    "app-failed": (
        {
            **RUNNING,
            **ENDED,
            "jobDeploymentStatus": "Failed",
            "jobStatus": "FAILED",
            "reason": "AppFailed",
            "failed": 3,
            "message": "Job entrypoint command failed with exit code 1, last available logs: rcm-worker: error: "
            "teacher.uri s3://ckpt/t.safetensors: cannot read it",
        },
        JobState.FAILED,
        "rcm-worker: error: teacher.uri",
    ),
    "deadline-exceeded": (
        {
            **RUNNING,
            **ENDED,
            "jobDeploymentStatus": "Failed",
            "jobStatus": "RUNNING",
            "reason": "DeadlineExceeded",
            "message": "The RayJob has passed the activeDeadlineSeconds. StartTime: 2026-11-20 10:00:00. "
            "ActiveDeadlineSeconds: 3600",
        },
        JobState.FAILED,
        "time limit",
    ),
    "stuck-initializing": (
        {
            **BASE_STATUS,
            **ENDED,
            "jobDeploymentStatus": "Failed",
            "jobStatus": "",
            "reason": "PreRunningDeadlineExceeded",
            "message": "The RayJob did not reach Running within preRunningDeadlineSeconds: 1800",
        },
        JobState.FAILED,
        "did not start",
    ),
    "submission-failed": (
        {
            **RUNNING,
            **ENDED,
            "jobDeploymentStatus": "Failed",
            "jobStatus": "PENDING",
            "reason": "SubmissionFailed",
            "message": "Job submission has failed. Reason: BackoffLimitExceeded. Message: Job has reached the "
            "specified backoff limit",
        },
        JobState.FAILED,
        "BackoffLimitExceeded",
    ),
    "validation-failed": (
        {
            "jobDeploymentStatus": "ValidationFailed",
            "reason": "ValidationFailed",
            "message": "The RayJob metadata is invalid: RayJob name should be no more than 47 characters",
        },
        JobState.FAILED,
        "47 characters",
    ),
    "retrying": (
        {**BASE_STATUS, "jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "failed": 1},
        JobState.STARTING,
        "1 failed",
    ),
    "retry-restarted": (
        {**BASE_STATUS, "jobDeploymentStatus": "New", "jobStatus": "", "failed": 1},
        JobState.QUEUED,
        None,
    ),
    "suspending": ({**RUNNING, "jobDeploymentStatus": "Suspending", "jobStatus": "RUNNING"}, JobState.CANCELLING, None),
    "suspended": (
        {"jobDeploymentStatus": "Suspended", "jobStatus": "", "observedGeneration": 2},
        JobState.CANCELLED,
        "suspended",
    ),
    "waiting": ({**BASE_STATUS, "jobDeploymentStatus": "Waiting", "jobStatus": ""}, JobState.STARTING, None),
    "unknown-newer-status": ({**BASE_STATUS, "jobDeploymentStatus": "Scaling"}, JobState.STARTING, "Scaling"),
}


def rayjob_object(status: dict | None, **metadata) -> dict:
    obj = build_rayjob(JOB_ID, example_spec(), "run-1", make_settings())
    obj["metadata"] |= {"uid": "3f1c", "resourceVersion": "42", "generation": 1, **metadata}
    if status is not None:
        obj["status"] = status
    return obj


@pytest.mark.parametrize("case", sorted(STATUS_CASES))
def test_status_object_is_shaped_as_kuberay_writes_it(case):
    status, _, _ = STATUS_CASES[case]
    assert checks.crd_validator("RayJob").is_valid(rayjob_object(status)), case


@pytest.mark.parametrize("case", sorted(STATUS_CASES))
def test_rayjob_state_maps_both_statuses(case):
    status, expected, words = STATUS_CASES[case]
    state, message = rayjob_state(rayjob_object(status))
    assert state == expected
    if words:
        assert words in (message or ""), message


def test_rayjob_state_of_a_missing_or_deleting_rayjob():
    assert rayjob_state(None)[0] == JobState.CANCELLED  # deleted (our cancel, or an administrator)
    deleting = rayjob_object(RUNNING | {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    deleting["metadata"]["deletionTimestamp"] = "2026-11-20T10:30:00Z"
    assert rayjob_state(deleting)[0] == JobState.CANCELLING


# -- KubeRayCluster against a fake CustomObjectsApi -----------------------------------------------------------


class FakeCustomObjects:
    """Stands in for `kubernetes.client.CustomObjectsApi`: RayJobs by name, every call recorded, failures on demand."""

    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.calls: list[tuple[str, dict]] = []
        self.fail: Exception | None = None

    def _enter(self, method, group, version, namespace, plural, kwargs):
        assert (group, version, namespace, plural) == ("ray.io", "v1", "rcm", "rayjobs")
        assert kwargs.pop("_request_timeout") > 0  # never an unbounded call from the reconciler thread
        self.calls.append((method, kwargs))
        if self.fail is not None:
            raise self.fail

    def create_namespaced_custom_object(self, group, version, namespace, plural, **kw):
        self._enter("create", group, version, namespace, plural, kw)
        name = kw["body"]["metadata"]["name"]
        if name in self.objects:
            raise ApiException(status=409, reason="Conflict")
        self.objects[name] = copy.deepcopy(kw["body"])
        return self.objects[name]

    def get_namespaced_custom_object(self, group, version, namespace, plural, **kw):
        self._enter("get", group, version, namespace, plural, kw)
        if kw["name"] not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.objects[kw["name"]])

    def patch_namespaced_custom_object(self, group, version, namespace, plural, **kw):
        self._enter("patch", group, version, namespace, plural, kw)
        if kw["name"] not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        self.objects[kw["name"]]["spec"] |= kw["body"]["spec"]
        return self.objects[kw["name"]]

    def delete_namespaced_custom_object(self, group, version, namespace, plural, **kw):
        self._enter("delete", group, version, namespace, plural, kw)
        if self.objects.pop(kw["name"], None) is None:
            raise ApiException(status=404, reason="Not Found")
        return {"status": "Success"}

    def list_namespaced_custom_object(self, group, version, namespace, plural, **kw):
        self._enter("list", group, version, namespace, plural, kw)
        return {"items": list(self.objects.values())[: kw.get("limit")]}

    def set_status(self, name: str, **status):
        self.objects[name]["status"] = {**BASE_STATUS, **status}


@pytest.fixture
def kuberay():
    api = FakeCustomObjects()
    return KubeRayCluster(make_settings(), api=api), api


@pytest.mark.parametrize("setting", ["KUBERAY_GPUS_PER_POD", "KUBERAY_CPUS_PER_WORKER", "KUBERAY_ACTIVE_DEADLINE_S"])
def test_nonsense_sizes_fail_at_start_up(setting):
    with pytest.raises(ValueError, match=setting):
        KubeRayCluster(make_settings(**{setting: 0}), api=FakeCustomObjects())


def test_submit_creates_the_rayjob(kuberay):
    cluster, api = kuberay
    name = cluster.submit(JOB_ID, example_spec(), "run-1")
    assert name == f"rcm-{JOB_ID}" and api.calls[0][0] == "create"
    assert api.objects[name] == build_rayjob(JOB_ID, example_spec(), "run-1", make_settings())
    assert cluster.status(name).state == JobState.QUEUED  # no status until the operator reconciles it


def test_submit_twice_is_idempotent(kuberay):
    """A pass that created the RayJob but died before recording it: the next pass finds it (409) and goes on."""
    cluster, api = kuberay
    assert cluster.submit(JOB_ID, example_spec(), "run-1") == cluster.submit(JOB_ID, example_spec(), "run-1")
    assert [c[0] for c in api.calls] == ["create", "create"] and len(api.objects) == 1


def test_submit_rejected_by_the_api_server_fails_the_job(kuberay):
    cluster, api = kuberay
    api.fail = ApiException(status=422, reason="Unprocessable Entity")
    api.fail.body = '{"message": "RayJob.ray.io is invalid: spec.backoffLimit: Invalid value"}'
    name = cluster.submit(JOB_ID, example_spec(), "run-1")
    status = cluster.status(name)
    assert (status.status, status.state) == ("FAILED", JobState.FAILED)
    assert "422" in status.message and "backoffLimit" in status.message


@pytest.mark.parametrize(
    "error",
    [
        ApiException(status=503, reason="Service Unavailable"),
        ApiException(status=403, reason="Forbidden"),
        urllib3.exceptions.MaxRetryError(None, "/apis", "connection refused"),
    ],
    ids=["503", "403", "unreachable"],
)
def test_kubernetes_outage_reads_as_cluster_unavailable(kuberay, error):
    """The reconciler keeps a job's state and retries on httpx.HTTPError: an API outage must look like one."""
    cluster, api = kuberay
    api.fail = error
    for call in (
        lambda: cluster.submit(JOB_ID, example_spec(), "r"),
        lambda: cluster.status(NAME),
        lambda: cluster.stop(NAME),
    ):
        with pytest.raises(KubernetesUnavailable) as info:
            call()
        assert isinstance(info.value, httpx.HTTPError)


def test_submit_without_the_crd_or_namespace_waits(kuberay):
    """404 on create: KubeRay's CRD or the namespace is missing, a deployment problem; the job stays QUEUED."""
    cluster, api = kuberay
    api.fail = ApiException(status=404, reason="Not Found")
    with pytest.raises(KubernetesUnavailable):
        cluster.submit(JOB_ID, example_spec(), "run-1")


def test_status_follows_the_rayjob(kuberay):
    cluster, api = kuberay
    name = cluster.submit(JOB_ID, example_spec(), "run-1")
    api.set_status(name, jobDeploymentStatus="Running", jobStatus="RUNNING")
    assert (cluster.status(name).status, cluster.status(name).state) == ("RUNNING", JobState.RUNNING)
    api.set_status(name, jobDeploymentStatus="Retrying", jobStatus="FAILED", failed=1)
    assert (cluster.status(name).status, cluster.status(name).state) == ("PENDING", JobState.STARTING)
    api.set_status(name, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    assert (cluster.status(name).status, cluster.status(name).state) == ("SUCCEEDED", JobState.SUCCEEDED)
    api.objects.clear()  # deleted: LOST (the reconciler ends it CANCELLED if it was cancelling, else resubmits it)
    assert cluster.status(name).status == "LOST"


def test_stop_deletes_the_rayjob_by_default(kuberay):
    cluster, api = kuberay
    name = cluster.submit(JOB_ID, example_spec(), "run-1")
    cluster.stop(name)
    assert api.calls[-1] == ("delete", {"name": name, "propagation_policy": "Background"})
    assert name not in api.objects
    cluster.stop(name)  # already gone: nothing to do


def test_stop_suspends_with_the_suspend_policy():
    api = FakeCustomObjects()
    cluster = KubeRayCluster(make_settings(KUBERAY_CANCEL_POLICY="suspend"), api=api)
    name = cluster.submit(JOB_ID, example_spec(), "run-1")
    cluster.stop(name)
    assert api.calls[-1] == ("patch", {"name": name, "body": {"spec": {"suspend": True}}})
    assert api.objects[name]["spec"]["suspend"] is True
    api.set_status(name, jobDeploymentStatus="Suspended", jobStatus="")
    assert cluster.status(name).state == JobState.CANCELLED


def test_healthy_checks_the_kubernetes_api(kuberay, monkeypatch):
    cluster, api = kuberay
    monkeypatch.setattr(cluster.mlflow, "get", lambda path: httpx.Response(200, request=httpx.Request("GET", path)))
    monkeypatch.setattr(cluster.s3, "head_bucket", lambda Bucket: {})
    assert cluster.healthy() == {"kubernetes": True, "mlflow": True, "s3": True}
    api.fail = ApiException(status=403, reason="Forbidden")  # RBAC missing: not ready
    assert cluster.healthy()["kubernetes"] is False


def test_reconciler_runs_a_job_through_kuberay(tmp_path, kuberay, monkeypatch):
    """The real reconciler with this backend: QUEUED -> STARTING -> RUNNING -> SUCCEEDED, then a failed job
    whose retries run out keeps KubeRay's reason, and a cancelled one is deleted after the grace period."""
    cluster, api = kuberay
    progress: dict[str, dict[str, float]] = {}
    run_status: dict[str, str] = {}
    monkeypatch.setattr(cluster, "create_run", lambda experiment, job_id, name: f"run-{job_id}")
    monkeypatch.setattr(cluster, "run_progress", lambda run_id: progress.get(run_id, {}))
    monkeypatch.setattr(cluster, "set_run_status", lambda run_id, status: run_status.__setitem__(run_id, status))
    url = f"sqlite:///{tmp_path / 'rcm.db'}"
    run_migrations(url)
    session = make_sessionmaker(make_engine(url))()
    spec = JobCreate.model_validate(json.loads(EXAMPLES[0].read_text()))

    def step(job: Job) -> Job:
        reconcile_once(session, cluster)
        session.refresh(job)
        return job

    job, _ = crud.create_job(session, "t", spec, None)
    assert step(job).state == JobState.STARTING and job.ray_submission_id in api.objects
    api.set_status(job.ray_submission_id, jobDeploymentStatus="Running", jobStatus="RUNNING")
    progress[job.mlflow_run_id] = {"step": 100.0, "loss": 0.5}
    assert step(job).state == JobState.RUNNING and job.step == 100
    api.set_status(job.ray_submission_id, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    assert step(job).state == JobState.SUCCEEDED and run_status[job.mlflow_run_id] == "FINISHED"

    failed, _ = crud.create_job(session, "t", spec, None)
    step(failed)
    api.set_status(failed.ray_submission_id, **STATUS_CASES["deadline-exceeded"][0])
    assert step(failed).state == JobState.FAILED and "DeadlineExceeded" in failed.failure_reason
    assert run_status[failed.mlflow_run_id] == "FAILED"

    cancelled, _ = crud.create_job(session, "t", spec, None)
    step(cancelled)
    monkeypatch.setattr(cluster, "request_cancel", lambda job_id: None)  # the S3 marker
    crud.set_state(session, cancelled, JobState.CANCELLING)
    cancelled.updated_at = cancelled.updated_at.replace(year=2000)  # past the reconciler's grace period
    session.commit()
    step(cancelled)  # the worker never stopped by itself: the reconciler stops the RayJob (delete)
    assert cancelled.ray_submission_id not in api.objects
    assert step(cancelled).state == JobState.CANCELLED and run_status[cancelled.mlflow_run_id] == "KILLED"
    session.close()


def test_lifespan_builds_the_configured_backend(tmp_path, monkeypatch):
    """CLUSTER_BACKEND=kuberay makes service/main.py's lifespan build a KubeRayCluster (stubbed: no kubeconfig)."""
    import asyncio

    from fastapi import FastAPI

    import service.kuberay
    import service.main

    class StubKubeRay:
        def __init__(self, settings):
            self.backend = settings.CLUSTER_BACKEND

    settings = make_settings(
        CLUSTER_BACKEND="kuberay", DATABASE_URL=f"sqlite:///{tmp_path / 'rcm.db'}", RECONCILE_INTERVAL_S=60
    )
    monkeypatch.setattr(service.kuberay, "KubeRayCluster", StubKubeRay)
    monkeypatch.setattr(service.main, "get_settings", lambda: settings)
    app = FastAPI()

    async def start_and_stop():
        async with service.main.lifespan(app):
            pass

    asyncio.run(start_and_stop())
    assert isinstance(app.state.cluster, StubKubeRay) and app.state.cluster.backend == "kuberay"
    assert make_settings().CLUSTER_BACKEND == "ray-jobs"  # the default keeps the local stack as it was


def test_example_in_the_docs_is_current():
    """deploy/kubernetes/examples/rayjob-shapes-8gpu.yaml (shown in deploy/README.md) validates against the CRD
    and is what the backend builds today. The embedded job spec may lag behind new spec defaults: it only has to
    remain a spec the API accepts."""
    from tests.deploy.example_rayjob import EXAMPLE_PATH, example_rayjob

    def split_spec(obj: dict) -> tuple[dict, dict, dict]:
        obj = copy.deepcopy(obj)
        env = yaml.safe_load(obj["spec"].pop("runtimeEnvYAML"))["env_vars"]
        return obj, {**env, "RCM_JOB_SPEC": None}, json.loads(env["RCM_JOB_SPEC"])

    committed = yaml.safe_load(EXAMPLE_PATH.read_text())
    assert checks.custom_resource_errors(committed) == []
    *rest, spec = split_spec(committed)
    assert rest == list(split_spec(example_rayjob())[:2]), "regenerate: python -m tests.deploy.example_rayjob"
    JobCreate.model_validate(spec)


def test_submit_task_creates_a_one_worker_rayjob_for_an_operation(kuberay):
    """Sample previews and dataset preparation (service/operations.py) on KubeRay: a valid RayJob named as the Ray
    submission, running the operation's entry point with its env (no secrets), followed like a job's."""
    cluster, api = kuberay
    env = {"RCM_SAMPLE_ID": "s1", "RCM_SAMPLE_REQUEST": '{"steps": 2}'}
    name = cluster.submit_task(f"rcm-s-{JOB_ID}", "python -m workers.samples", env)
    assert name == f"rcm-s-{JOB_ID}" and api.objects[name]["spec"]["entrypoint"] == "python -m workers.samples"
    obj = api.objects[name]
    assert checks.custom_resource_errors(obj) == []
    task_env = yaml.safe_load(obj["spec"]["runtimeEnvYAML"])["env_vars"]
    assert task_env["RCM_SAMPLE_REQUEST"] == '{"steps": 2}' and task_env["RCM_CHECKPOINT_BUCKET"] == "ckpt"
    assert not any("SECRET" in k or "ACCESS_KEY" in k for k in task_env)
    assert obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 1
    assert cluster.submit_task(name, "python -m workers.samples", env) == name  # a retry: the same RayJob
    assert cluster.status(name).status == "PENDING"
