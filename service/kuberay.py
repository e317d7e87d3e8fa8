"""The KubeRay backend: each job runs as its own RayJob (ray.io/v1) on a Ray cluster KubeRay creates for it.

`KubeRayCluster` has `RayCluster`'s interface (MLflow and S3 are shared with it); `submit`, `status`, `stop`
and `healthy` talk to the Kubernetes API through the official client's `CustomObjectsApi` instead of Ray's
Jobs REST API. `build_rayjob` (job spec -> RayJob) and `rayjob_state` (RayJob status -> API state) are pure
functions, tested offline against the KubeRay v1.7.0 CRD schema and status objects shaped as KubeRay writes them.

Status semantics follow KubeRay's RayJob controller (ray-operator/controllers/ray/rayjob_controller.go):
`jobDeploymentStatus` is the RayJob's lifecycle (Initializing -> Running -> Complete | Failed, plus Retrying,
Suspending/Suspended, ValidationFailed); `jobStatus` is the Ray job's own (PENDING, RUNNING, SUCCEEDED, FAILED,
STOPPED). A failed attempt is retried (Failed -> Retrying -> New) while `status.failed <= backoffLimit`, so
only the deployment status says whether a job is over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import urllib3
import yaml

from service.cluster import LOST, ClusterJobStatus, RayCluster, public_failure
from service.schemas import JobState, ResourcesSpec
from service.settings import Settings

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
RAY_VERSION = "2.60.0"  # the Ray in the worker image (constraints.txt); KubeRay gates features on it
MAX_NAME_LENGTH = 47  # KubeRay rejects longer RayJob names (it derives RayCluster and Service names from them)
BACKOFF_LIMIT = 2  # whole-cluster retries; each reruns the entrypoint, which resumes from the S3 checkpoint
PRE_RUNNING_DEADLINE_S = 1800  # image pulls of the CUDA image and GPU capacity waits; past this: Failed
TTL_AFTER_FINISHED_S = 120  # the finished job's Ray cluster lives this long (logs), then KubeRay deletes it
HEAD_CPUS, HEAD_MEMORY_GI = 2, 8  # the head runs only the driver (teacher check/download) and Ray's services
REQUEST_TIMEOUT_S = 10.0
POD_LABELS = {"app.kubernetes.io/name": "rcm-ray", "app.kubernetes.io/part-of": "rcm"}  # NetworkPolicy selects these
# The reconciler's view (Ray job states) of each API state: CANCELLING stays non-terminal until KubeRay is done.
RAY_STATUS = {
    JobState.QUEUED: "PENDING",
    JobState.STARTING: "PENDING",
    JobState.RUNNING: "RUNNING",
    JobState.CANCELLING: "RUNNING",
    JobState.SUCCEEDED: "SUCCEEDED",
    JobState.FAILED: "FAILED",
    JobState.CANCELLED: "STOPPED",
}
FAILURE_HINTS = {
    "DeadlineExceeded": "the job's time limit (activeDeadlineSeconds) passed",
    "PreRunningDeadlineExceeded": "the Ray cluster did not start within preRunningDeadlineSeconds "
    "(image pull, GPU capacity or quota?)",
    "SubmissionFailed": "the submitter pod could not submit the job to the Ray cluster",
    "ValidationFailed": "KubeRay rejected the RayJob",
}


class KubernetesUnavailable(httpx.TransportError):
    """The Kubernetes API did not answer or refused the call.

    A subclass of httpx's error on purpose: the reconciler treats `httpx.HTTPError` as "the cluster is
    unavailable: keep the stored state and try again", which is what a Kubernetes API outage means too.
    """


@dataclass
class RayJobStatus(ClusterJobStatus):
    """`ClusterJobStatus` (what the reconciler reads) plus the API state the RayJob maps to."""

    state: JobState = JobState.QUEUED


def rayjob_name(job_id: str) -> str:
    """`rcm-<job id>`: a DNS-1035 label of 40 characters for a UUID, under KubeRay's 47."""
    name = f"rcm-{job_id}".lower()
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"RayJob name {name!r} is over {MAX_NAME_LENGTH} characters")
    return name


def job_env(job_id: str, spec: dict[str, Any], run_id: str, settings: Settings) -> dict[str, str]:
    """The per-job environment, the same as the ray-jobs backend's runtime_env (a test keeps them equal).

    NOTE: no secrets: the S3 keys reach the Ray pods from a Kubernetes Secret (see `_ray_container`).
    """
    return {
        "RCM_JOB_ID": job_id,
        "RCM_JOB_SPEC": json.dumps(spec),
        "RCM_MLFLOW_RUN_ID": run_id,
        "MLFLOW_TRACKING_URI": settings.MLFLOW_TRACKING_URI,
        "RCM_S3_ENDPOINT_URL": settings.S3_ENDPOINT_URL,
        "RCM_S3_REGION": settings.S3_REGION,
        "RCM_CHECKPOINT_BUCKET": settings.CHECKPOINT_BUCKET,
    }


def workers_per_pod(num_workers: int, max_per_pod: int) -> int:
    """The largest divisor of `num_workers` that fits one pod, so every pod is full (no idle GPUs)."""
    return max(d for d in range(1, min(num_workers, max_per_pod) + 1) if num_workers % d == 0)


def _ray_container(name: str, settings: Settings, cpus: int, memory_gi: int, gpus: int) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory_gi}Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)  # extended resource: limits only (requests default to it)
    secret = settings.KUBERAY_S3_SECRET
    return {
        "name": name,  # KubeRay runs Ray in the first container of each pod
        "image": settings.KUBERAY_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            # S3 keys in the node environment (inherited by the driver and every Ray worker process), never in
            # the runtime env, which the Ray dashboard shows.
            {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": secret, "key": "AWS_ACCESS_KEY_ID"}}},
            {
                "name": "AWS_SECRET_ACCESS_KEY",
                "valueFrom": {"secretKeyRef": {"name": secret, "key": "AWS_SECRET_ACCESS_KEY"}},
            },
            {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        ],
        # Guaranteed QoS: requests equal limits, so a busy node never evicts a training pod first.
        "resources": {"requests": {"cpu": str(cpus), "memory": f"{memory_gi}Gi"}, "limits": limits},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }


def _pod_template(container: dict[str, Any], job_id: str, memory_gi: int, gpus: int) -> dict[str, Any]:
    shm = f"{max(1, memory_gi * 3 // 10)}Gi"
    spec: dict[str, Any] = {
        "containers": [container],
        # Ray's object store and NCCL live in /dev/shm; Docker's default 64 MiB would spill or crash. Memory-backed,
        # counted against the pod's memory limit, sized like Ray's default object store (30% of memory).
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}],
        "automountServiceAccountToken": False,  # Ray pods never call the Kubernetes API
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001},  # the image's `rcm` user
    }
    if gpus:
        # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule so that only GPU pods land on them.
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {**POD_LABELS, "rcm.io/job-id": job_id}}, "spec": spec}


def build_rayjob(job_id: str, spec: dict[str, Any], run_id: str, settings: Settings) -> dict[str, Any]:
    """The RayJob that runs one job: its own Ray cluster, sized from `spec["resources"]`, deleted when done.

    Args:
        job_id: the API's job id; names the RayJob, the Ray submission and (in the worker) the Ray Train run, so
            a retried attempt resumes from the run's latest checkpoint in S3.
        spec: the validated job spec (JobCreate as a dict), passed to the worker unchanged.
        run_id: the MLflow run the worker logs to.
        settings: image, namespace, S3 Secret, per-worker CPU/memory, GPUs per pod, default time limit.

    Returns:
        The RayJob object (a dict), ready for `CustomObjectsApi.create_namespaced_custom_object`.
    """
    # the stored spec holds only what was set: the schema's defaults fill the rest
    res = {**ResourcesSpec().model_dump(), **spec.get("resources", {})}
    num_workers, use_gpu = int(res["num_workers"]), bool(res["use_gpu"])
    per_pod = workers_per_pod(num_workers, settings.KUBERAY_GPUS_PER_POD) if use_gpu else 1
    cpus, memory_gi = per_pod * settings.KUBERAY_CPUS_PER_WORKER, per_pod * settings.KUBERAY_MEMORY_GI_PER_WORKER
    gpus = per_pod if use_gpu else 0
    num_pods = num_workers // per_pod
    group = "gpu-workers" if use_gpu else "cpu-workers"
    # The job's own limit when the spec carries one (resources.time_limit_s), else the deployment's default.
    time_limit_s = int(res.get("time_limit_s") or settings.KUBERAY_ACTIVE_DEADLINE_S)
    name = rayjob_name(job_id)
    head_start = {"num-cpus": "0", "dashboard-host": "0.0.0.0"}  # num-cpus 0: no training work on the head
    worker_start = {"num-cpus": str(cpus), **({"num-gpus": str(gpus)} if gpus else {})}
    head = _ray_container("ray-head", settings, HEAD_CPUS, HEAD_MEMORY_GI, 0)
    head["ports"] = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
    ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": settings.KUBERAY_NAMESPACE,
            "labels": {"app.kubernetes.io/managed-by": "rcm-control-plane", "rcm.io/job-id": job_id},
            "annotations": {"rcm.io/mlflow-run-id": run_id},
        },
        "spec": {
            "entrypoint": settings.WORKER_ENTRYPOINT,
            # One line per variable (no wrapping of the JSON spec), so `kubectl get rayjob -o yaml` stays readable.
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": job_env(job_id, spec, run_id, settings)}, width=2**20),
            "jobId": name,  # the Ray submission id, as the ray-jobs backend names it
            "metadata": {"rcm_job_id": job_id},
            "submissionMode": "K8sJobMode",  # a submitter pod runs `ray job submit` and follows the logs
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_AFTER_FINISHED_S,
            "backoffLimit": BACKOFF_LIMIT,
            "preRunningDeadlineSeconds": PRE_RUNNING_DEADLINE_S,
            "activeDeadlineSeconds": time_limit_s,  # counts from Initializing, retries included
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": False,  # fixed size: Ray Train gangs all workers at once
                # Token auth: KubeRay generates a per-cluster token Secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on
                # every Ray container and on the submitter; the control plane never calls this cluster directly.
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    "rayStartParams": head_start,
                    "template": _pod_template(head, job_id, HEAD_MEMORY_GI, 0),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": group,
                        "replicas": num_pods,
                        "minReplicas": num_pods,
                        "maxReplicas": num_pods,
                        "rayStartParams": worker_start,
                        "template": _pod_template(
                            _ray_container("ray-worker", settings, cpus, memory_gi, gpus), job_id, memory_gi, gpus
                        ),
                    }
                ],
            },
        },
    }


def _failure(reason: str, message: str | None, fallback: str) -> str:
    hint = FAILURE_HINTS.get(reason)
    parts = [p for p in (f"{reason}: {hint}" if hint else reason, message) if p]
    return "; ".join(parts) or fallback


def rayjob_state(rayjob: dict[str, Any] | None) -> tuple[JobState, str | None]:
    """The API state of a RayJob (None: it no longer exists) and a message for failures and retries."""
    if rayjob is None:
        return JobState.CANCELLED, "the RayJob no longer exists (deleted)"
    if rayjob.get("metadata", {}).get("deletionTimestamp"):
        return JobState.CANCELLING, "the RayJob is being deleted"
    status = rayjob.get("status") or {}
    deployment, job = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
    reason, message = status.get("reason", ""), public_failure(status.get("message") or None)
    if deployment == "Complete":  # the Ray job is over and the submitter has finished
        if job == "SUCCEEDED":
            return JobState.SUCCEEDED, None
        if job == "STOPPED":
            return JobState.CANCELLED, "the Ray job was stopped"
        return JobState.FAILED, _failure(reason, message, f"the Ray job ended {job or 'without a status'}")
    if deployment in ("Failed", "ValidationFailed"):  # retries (backoffLimit) are exhausted or never allowed
        return JobState.FAILED, _failure(reason, message, f"the RayJob {deployment.lower()}")
    if deployment == "Suspended":  # what cancelling with KUBERAY_CANCEL_POLICY=suspend ends in
        return JobState.CANCELLED, "the RayJob was suspended"
    if deployment == "Suspending":
        return JobState.CANCELLING, None
    if deployment == "Retrying":  # an attempt failed; a new cluster reruns the entrypoint, resuming from S3
        attempts = int(status.get("failed") or 0)
        return JobState.STARTING, f"retrying on a new Ray cluster after {attempts} failed attempt(s)"
    if deployment == "Running":  # cluster and submitter exist; the Ray job decides
        if job == "RUNNING":
            return JobState.RUNNING, None
        if job == "STOPPED":
            return JobState.CANCELLING, "the Ray job was stopped"
        if job in ("SUCCEEDED", "FAILED"):  # not final until KubeRay says so: a failed attempt may be retried
            return JobState.RUNNING, None
        return JobState.STARTING, None  # "" or PENDING: submitted, runtime env being set up
    if deployment in ("Initializing", "Waiting"):  # Ray cluster pods being scheduled, pulled, started
        return JobState.STARTING, None
    if deployment in ("", "New", "Scheduling", "Scheduled"):  # not picked up by the operator yet
        return JobState.QUEUED, None
    return JobState.STARTING, f"unknown jobDeploymentStatus {deployment!r} (newer KubeRay?)"


class KubeRayCluster(RayCluster):
    """`RayCluster` whose jobs are RayJobs in `KUBERAY_NAMESPACE`; MLflow and S3 access are inherited."""

    def __init__(self, settings: Settings, api: Any = None) -> None:
        for name in ("KUBERAY_GPUS_PER_POD", "KUBERAY_CPUS_PER_WORKER", "KUBERAY_MEMORY_GI_PER_WORKER"):
            if getattr(settings, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(settings, name)}")
        if not 0 < settings.KUBERAY_ACTIVE_DEADLINE_S < 2**31:  # the CRD's int32
            raise ValueError(f"KUBERAY_ACTIVE_DEADLINE_S out of range: {settings.KUBERAY_ACTIVE_DEADLINE_S}")
        super().__init__(settings)
        if api is None:
            from kubernetes import client, config  # imported here: ~0.4 s the ray-jobs backend never pays

            try:  # the Deployment's ServiceAccount (RBAC: rayjobs in its namespace)
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:  # outside a cluster: the current kubeconfig context
                config.load_kube_config()  # type: ignore[no-untyped-call]
            api = client.CustomObjectsApi()
        self.k8s = api
        self.namespace = settings.KUBERAY_NAMESPACE
        self._rejected: dict[str, str] = {}  # RayJobs the API server refused, reported FAILED by `status`

    def _call(self, method: str, **kwargs: Any) -> Any:
        """One CustomObjectsApi call on rayjobs; every failure but 404/409/4xx-invalid becomes KubernetesUnavailable."""
        from kubernetes.client.exceptions import ApiException

        fn = getattr(self.k8s, method)
        try:
            return fn(GROUP, VERSION, self.namespace, PLURAL, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)
        except ApiException as exc:
            if exc.status in (400, 404, 409, 422):
                raise
            raise KubernetesUnavailable(f"Kubernetes API: {exc.status} {exc.reason}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # connection refused, timeouts, TLS
            raise KubernetesUnavailable(f"Kubernetes API unreachable: {type(exc).__name__}") from exc

    def submit(self, job_id: str, spec: dict[str, Any], run_id: str) -> str:
        from kubernetes.client.exceptions import ApiException

        body, name = build_rayjob(job_id, spec, run_id, self.settings), rayjob_name(job_id)
        try:
            self._call("create_namespaced_custom_object", body=body)
        except ApiException as exc:
            if exc.status == 409:  # created by an earlier pass that died before recording it: same job
                return name
            if exc.status == 404:  # no such namespace, or the RayJob CRD is not installed: fix the deployment
                raise KubernetesUnavailable(f"Kubernetes API: 404 creating rayjobs in {self.namespace!r}") from exc
            # 400/422: the API server (CRD schema, admission) refused it. Retrying cannot help, and raising would
            # stall the reconciler's pass, so the job is failed through `status`. NOTE: kept in memory only; after
            # a restart the missing RayJob reads as LOST: resubmitted (and rejected again) up to MAX_RESUBMITS.
            self._rejected[name] = f"Kubernetes rejected the RayJob: {exc.status} {exc.reason}: {exc.body}"[:2000]
        return name

    def submit_task(self, submission_id: str, entrypoint: str, env: dict[str, str]) -> str:
        """One operation (sample preview, dataset preparation) as a RayJob of one CPU worker, named as the
        ray-jobs backend names its submission (`rcm-<kind letter>-<id>`), with the S3 endpoint and `env`."""
        from kubernetes.client.exceptions import ApiException

        s = self.settings
        body = build_rayjob(submission_id.removeprefix("rcm-"), {"resources": {"num_workers": 1}}, "", s)
        task_env = {"RCM_S3_ENDPOINT_URL": s.S3_ENDPOINT_URL, "RCM_S3_REGION": s.S3_REGION}
        task_env |= {"RCM_CHECKPOINT_BUCKET": s.CHECKPOINT_BUCKET, **env}
        body["spec"]["entrypoint"] = entrypoint
        body["spec"]["runtimeEnvYAML"] = yaml.safe_dump({"env_vars": task_env}, width=2**20)
        try:
            self._call("create_namespaced_custom_object", body=body)
        except ApiException as exc:
            if exc.status != 409:  # 409: created already by an earlier try of this request
                raise KubernetesUnavailable(f"Kubernetes API: {exc.status} {exc.reason}") from exc
        return str(body["metadata"]["name"])

    def read(self, name: str) -> dict[str, Any] | None:
        """The RayJob object, or None if it does not exist."""
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self._call("get_namespaced_custom_object", name=name)
            return obj
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubernetesUnavailable(f"Kubernetes API: {exc.status} {exc.reason}") from exc

    def status(self, submission_id: str) -> RayJobStatus:
        if submission_id in self._rejected:
            return RayJobStatus("FAILED", self._rejected[submission_id], JobState.FAILED)
        rayjob = self.read(submission_id)
        if rayjob is None:  # deleted: by our own cancel (the reconciler then ends the job CANCELLED) or by
            # someone else; a job not being cancelled is resubmitted and resumes from its checkpoint in S3
            return RayJobStatus(LOST, "the RayJob no longer exists", JobState.CANCELLED)
        state, message = rayjob_state(rayjob)
        return RayJobStatus(RAY_STATUS[state], message, state)

    def stop(self, submission_id: str) -> None:
        """Cancel for good: delete the RayJob (KubeRay stops the Ray job, then garbage-collects its cluster) or,
        with KUBERAY_CANCEL_POLICY=suspend, suspend it (cluster deleted, the RayJob kept for inspection)."""
        from kubernetes.client.exceptions import ApiException

        try:
            if self.settings.KUBERAY_CANCEL_POLICY == "suspend":
                self._call("patch_namespaced_custom_object", name=submission_id, body={"spec": {"suspend": True}})
            else:
                self._call("delete_namespaced_custom_object", name=submission_id, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:  # already gone is what we wanted
                raise KubernetesUnavailable(f"Kubernetes API: {exc.status} {exc.reason}") from exc

    def _probes(self) -> list[tuple[str, Any]]:
        """Kubernetes instead of the Ray Jobs API; MLflow and S3 as in RayCluster."""
        probes = [p for p in super()._probes() if p[0] != "ray"]
        return [("kubernetes", lambda: self._call("list_namespaced_custom_object", limit=1)), *probes]
