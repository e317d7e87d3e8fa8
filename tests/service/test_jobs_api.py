"""REST API unit tests: the real app and SQLite job store, with the cluster backend swapped for a fake."""

import json

import pytest
from fastapi.testclient import TestClient

from service.cluster import ClusterJobStatus
from service.reconciler import Limits, reconcile_once
from tests.service.fakes import FakeCluster

# tenant-a's own input (service/inputs.py: s3://INPUTS_BUCKET/tenants/<tenant>/...)
SPEC = {"name": "unit", "teacher": {"uri": "s3://ckpt/tenants/tenant-a/t.safetensors"}, "schedule": {"steps": 100}}
SPEC_B = {**SPEC, "teacher": {"uri": "s3://ckpt/tenants/tenant-b/t.safetensors"}}


@pytest.fixture(scope="module")
def app_and_tokens(tmp_path_factory):
    import os

    db = tmp_path_factory.mktemp("db") / "jobs.db"
    saved = dict(os.environ)  # restored at teardown: later modules (and the stacks they start) must not inherit
    os.environ.update(
        DATABASE_URL=f"sqlite:///{db}",
        S3_ACCESS_KEY="k",
        S3_SECRET_KEY="s",
        RECONCILE_INTERVAL_S="3600",
        MAX_BODY_BYTES="4096",
        RATE_LIMIT_PER_S="1000",  # these tests are not about the rate limit (tests/service/test_rate_limits.py)
        MAX_INPUT_BYTES="65536",
    )
    from service.settings import get_settings

    get_settings.cache_clear()
    from service import crud
    from service.main import app

    cluster = FakeCluster()
    app.state.cluster = cluster
    with TestClient(app) as client:
        with app.state.sessionmaker() as s:
            tokens = {"a": crud.create_token(s, "tenant-a"), "b": crud.create_token(s, "tenant-b")}
        yield client, tokens, cluster, app
    del app.state.cluster
    os.environ.clear()
    os.environ.update(saved)
    get_settings.cache_clear()


def _h(token):
    return {"Authorization": f"Bearer {token}"}


def _reconcile(app, cluster):
    with app.state.sessionmaker() as s:  # no admission limits here (tests/service/test_reconciler.py has them)
        reconcile_once(s, cluster, Limits(max_active_jobs=10**6, max_active_per_tenant=10**6))


def test_create_job_returns_202_with_location(app_and_tokens):
    client, tokens, cluster, app = app_and_tokens
    r = client.post("/v1/jobs", json=SPEC, headers=_h(tokens["a"]))
    assert r.status_code == 202
    body = r.json()
    assert r.headers["location"] == f"/v1/jobs/{body['id']}"
    assert body["state"] == "QUEUED" and body["total_steps"] == 100
    # stored: only what the user set (the task's preset fills the rest); nothing resolved before the worker runs
    assert body["spec"] == SPEC and body["effective_config"] is None
    _reconcile(app, cluster)
    assert client.get(f"/v1/jobs/{body['id']}", headers=_h(tokens["a"])).json()["state"] == "STARTING"


def test_effective_config_from_the_worker_reaches_the_job(app_and_tokens):
    client, tokens, cluster, app = app_and_tokens
    spec = {"name": "eff", "teacher": {"uri": "builtin:toy2d"}}
    job = client.post("/v1/jobs", json=spec, headers=_h(tokens["a"])).json()
    assert job["total_steps"] == 0 and job["spec"] == spec  # no steps set: the preset decides
    _reconcile(app, cluster)
    cluster.ray_status[f"rcm-{job['id']}"] = ClusterJobStatus("RUNNING")
    effective = {"method": {"dmd_weight": 0.01, "critic_ratio": 4}, "schedule": {"steps": 1500}}
    cluster.effective[job["id"]] = effective  # what the worker wrote to S3 before training
    _reconcile(app, cluster)
    body = client.get(f"/v1/jobs/{job['id']}", headers=_h(tokens["a"])).json()
    assert body["effective_config"] == effective and body["total_steps"] == 1500 and body["spec"] == spec


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"teacher": {"uri": "http://x"}}, ["body", "teacher", "uri"]),
        ({"method": {"dmd_weight": -1}}, ["body", "method", "dmd_weight"]),
        ({"method": {"dmd_wieght": 1}}, ["body", "method", "dmd_wieght"]),
        ({"schedule": {"steps": 0}}, ["body", "schedule", "steps"]),
        ({"resources": {"num_workers": 1, "cp_degree": 2}}, ["body", "resources"]),
        ({"resources": {"num_workers": 4, "fsdp_degree": 2}}, ["body", "resources"]),
        ({"resources": {"num_workers": 0}}, ["body", "resources", "num_workers"]),
        ({"name": ""}, ["body", "name"]),
    ],
)
def test_create_job_invalid_spec_422_names_the_field(app_and_tokens, patch, loc):
    client, tokens, _, _ = app_and_tokens
    before = client.get("/v1/jobs", headers=_h(tokens["a"])).json()["data"]
    r = client.post("/v1/jobs", json={**SPEC, **patch}, headers=_h(tokens["a"]))
    assert r.status_code == 422
    assert any(e["loc"][: len(loc)] == loc for e in r.json()["detail"]), r.json()
    assert client.get("/v1/jobs", headers=_h(tokens["a"])).json()["data"] == before  # nothing lost or added


SHAPES = {"dataset": "shapes"}


@pytest.mark.parametrize(
    ("patch", "loc", "words"),
    [
        # parallel degrees: their product is the worker count; the batch splits evenly over fsdp_degree workers
        ({"resources": {"num_workers": 2}}, ["body", "resources"], ["fsdp_degree (1)", "cp_degree (1)", "(2)"]),
        (
            {"resources": {"num_workers": 2, "fsdp_degree": 2}, "schedule": {"steps": 10, "batch_size": 63}},
            ["body"],
            ["schedule.batch_size (63)", "resources.fsdp_degree (2)"],
        ),
        # the 2-D datasets train an MLP on CPU: no context parallelism, activation checkpointing or GPU
        ({"resources": {"num_workers": 2, "cp_degree": 2}}, ["body"], ["resources.cp_degree=2", "'ring8'"]),
        ({"resources": {"activation_checkpointing": "full"}}, ["body"], ["resources.activation_checkpointing"]),
        ({"resources": {"use_gpu": True}}, ["body"], ["resources.use_gpu=True"]),
        # prompt files: shapes only, an S3 object or a path inside the nodes' prompt directory
        ({"data": {"dataset": "ring8", "prompt_file_uri": "s3://ckpt/p.txt"}}, ["body", "data"], ["'shapes'"]),
        ({"data": {**SHAPES, "prompt_file_uri": "/proc/self/environ"}}, ["body", "data", "prompt_file_uri"], []),
        ({"data": {**SHAPES, "prompt_file_uri": "ok/../../x.txt"}}, ["body", "data", "prompt_file_uri"], []),
        ({"data": {**SHAPES, "prompt_file_uri": "http://x/p.txt"}}, ["body", "data", "prompt_file_uri"], []),
        ({"data": SHAPES, "teacher": {"uri": "builtin:toy2d"}}, ["body"], ["builtin:toy2d", "data.dataset"]),
        # shapes: the shipped teacher fits no other dataset
        ({"teacher": {"uri": "builtin:shapes"}}, ["body"], ["builtin:shapes", "'shapes'"]),
        ({"teacher": {"uri": "builtin:dit"}}, ["body", "teacher", "uri"], ["builtin:dit", "builtin:shapes"]),
        # evaluation settings
        ({"eval": {"num_samples": 5}}, ["body", "eval", "num_samples"], []),
        ({"eval": {"teacher_steps": [0, 4]}}, ["body", "eval", "teacher_steps"], ["[1, 1000]"]),
        ({"eval": {"teacher_steps": []}}, ["body", "eval", "teacher_steps"], []),
        ({"schedule": {"max_minutes": 0}}, ["body", "schedule", "max_minutes"], []),
        ({"schedule": {"max_minutes": 9000}}, ["body", "schedule", "max_minutes"], []),
        ({"eval": {"student_mid_times": [1.0, 1.2]}}, ["body", "eval", "student_mid_times"], ["decreasing"]),
        ({"eval": {"student_mid_times": [1.7]}}, ["body", "eval", "student_mid_times"], ["(0.2, pi/2)"]),
    ],
)
def test_create_job_resources_and_data_422_name_the_fields(app_and_tokens, patch, loc, words):
    client, tokens, _, _ = app_and_tokens
    r = client.post("/v1/jobs", json={**SPEC, **patch}, headers=_h(tokens["a"]))
    assert r.status_code == 422
    errors = [e for e in r.json()["detail"] if e["loc"] == loc]
    assert errors and all(w in errors[0]["msg"] for w in words), r.json()


@pytest.mark.parametrize(
    "patch",
    [
        {"resources": {"num_workers": 2, "fsdp_degree": 2}},
        {"resources": {"num_workers": 4, "fsdp_degree": 4}, "schedule": {"steps": 10, "batch_size": 64}},
        {"data": {**SHAPES, "prompt_file_uri": "s3://ckpt/tenants/tenant-a/geneval.txt"}},
        {"data": {**SHAPES, "prompt_file_uri": "geneval/colors.txt"}},
        {"data": SHAPES, "teacher": {"uri": "builtin:shapes"}, "resources": {"num_workers": 2, "fsdp_degree": 2}},
        {"data": SHAPES, "eval": {"num_samples": 16, "diversity_samples": 4, "teacher_steps": [4]}},
        # the shapes network's DiT blocks take context parallelism and activation checkpointing (issue 16)
        {"data": SHAPES, "resources": {"num_workers": 4, "fsdp_degree": 2, "cp_degree": 2, "use_gpu": True}},
        {"data": SHAPES, "resources": {"num_workers": 2, "cp_degree": 2, "fsdp_degree": 1}},
        {"data": SHAPES, "resources": {"activation_checkpointing": "selective"}},
    ],
)
def test_create_job_accepts_multi_worker_and_prompt_files(app_and_tokens, patch):
    client, tokens, _, _ = app_and_tokens
    r = client.post("/v1/jobs", json={**SPEC, **patch}, headers=_h(tokens["a"]))
    assert r.status_code == 202, r.json()
    assert r.json()["spec"].get("resources", {}) == patch.get("resources", {})


def test_create_job_idempotency_key(app_and_tokens):
    client, tokens, _, _ = app_and_tokens
    h = {**_h(tokens["a"]), "Idempotency-Key": "abc-1"}
    first = client.post("/v1/jobs", json=SPEC, headers=h)
    again = client.post("/v1/jobs", json=SPEC, headers=h)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other_tenant = client.post("/v1/jobs", json=SPEC_B, headers={**_h(tokens["b"]), "Idempotency-Key": "abc-1"})
    assert other_tenant.json()["id"] != first.json()["id"]


def test_read_jobs_requires_a_valid_token(app_and_tokens):
    client, *_ = app_and_tokens
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers=_h("rcm_wrong")).status_code == 401


def test_read_job_of_another_tenant_is_404(app_and_tokens):
    client, tokens, _, _ = app_and_tokens
    job = client.post("/v1/jobs", json=SPEC, headers=_h(tokens["a"])).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=_h(tokens["b"])).status_code == 404
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=_h(tokens["b"])).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/events", headers=_h(tokens["b"])).status_code == 404
    assert all(j["id"] != job["id"] for j in client.get("/v1/jobs", headers=_h(tokens["b"])).json()["data"])


def test_read_jobs_cursor_pagination_and_filter(app_and_tokens):
    client, tokens, _, _ = app_and_tokens
    for i in range(5):
        client.post("/v1/jobs", json={**SPEC_B, "name": f"page-{i}"}, headers=_h(tokens["b"]))
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params, headers=_h(tokens["b"])).json()
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    all_ids = [j["id"] for j in client.get("/v1/jobs", params={"limit": 200}, headers=_h(tokens["b"])).json()["data"]]
    assert seen == all_ids and len(set(seen)) == len(seen) >= 5
    queued = client.get("/v1/jobs", params={"state": "QUEUED"}, headers=_h(tokens["b"])).json()["data"]
    assert queued and all(j["state"] == "QUEUED" for j in queued)
    assert client.get("/v1/jobs", params={"cursor": "%%%"}, headers=_h(tokens["b"])).status_code == 422
    assert client.get("/v1/jobs", params={"state": "DONE"}, headers=_h(tokens["b"])).status_code == 422


def test_job_lifecycle_through_the_reconciler(app_and_tokens):
    client, tokens, cluster, app = app_and_tokens
    job = client.post("/v1/jobs", json=SPEC, headers=_h(tokens["a"])).json()
    _reconcile(app, cluster)
    sub, run = f"rcm-{job['id']}", f"run-{job['id']}"
    cluster.ray_status[sub] = ClusterJobStatus("RUNNING")
    cluster.progress[run] = {"step": 40.0, "loss": 0.5, "recovery_count": 1.0}
    _reconcile(app, cluster)
    body = client.get(f"/v1/jobs/{job['id']}", headers=_h(tokens["a"])).json()
    assert body["state"] == "RUNNING" and body["step"] == 40 and body["recovery_count"] == 1
    assert body["mlflow_run_url"].endswith(run) and body["metrics"]["loss"] == 0.5
    cluster.ray_status[sub] = ClusterJobStatus("SUCCEEDED")
    cluster.progress[run]["step"] = 100.0
    _reconcile(app, cluster)
    body = client.get(f"/v1/jobs/{job['id']}", headers=_h(tokens["a"])).json()
    assert body["state"] == "SUCCEEDED" and body["step"] == 100 and cluster.run_statuses[run] == "FINISHED"
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=_h(tokens["a"])).json()
    states = [e["data"]["state"] for e in events if e["kind"] == "state"]
    assert states == ["QUEUED", "STARTING", "RUNNING", "SUCCEEDED"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=_h(tokens["a"])).status_code == 409
    # server-sent events: history then the end of the stream (the job is terminal)
    with client.stream(
        "GET", f"/v1/jobs/{job['id']}/events", headers={**_h(tokens["a"]), "Accept": "text/event-stream"}
    ) as r:
        text = "".join(r.iter_text())
    assert text.count("event: state") == 4 and '"SUCCEEDED"' in text


def test_failed_job_keeps_the_reason_and_fails_the_run(app_and_tokens):
    client, tokens, cluster, app = app_and_tokens
    job = client.post("/v1/jobs", json=SPEC, headers=_h(tokens["a"])).json()
    _reconcile(app, cluster)
    cluster.ray_status[f"rcm-{job['id']}"] = ClusterJobStatus(
        "FAILED", "rcm-worker: error: teacher.uri s3://x: cannot read it"
    )
    _reconcile(app, cluster)
    body = client.get(f"/v1/jobs/{job['id']}", headers=_h(tokens["a"])).json()
    assert body["state"] == "FAILED" and "cannot read it" in body["failure_reason"]
    assert cluster.run_statuses[f"run-{job['id']}"] == "FAILED"


def test_cancel_job_running_and_queued(app_and_tokens):
    client, tokens, cluster, app = app_and_tokens
    running = client.post("/v1/jobs", json=SPEC, headers=_h(tokens["a"])).json()
    _reconcile(app, cluster)
    r = client.post(f"/v1/jobs/{running['id']}/cancel", headers=_h(tokens["a"]))
    assert r.status_code == 202 and r.json()["state"] == "CANCELLING" and running["id"] in cluster.cancelled
    cluster.ray_status[f"rcm-{running['id']}"] = ClusterJobStatus("SUCCEEDED")  # worker saved and exited
    _reconcile(app, cluster)
    assert client.get(f"/v1/jobs/{running['id']}", headers=_h(tokens["a"])).json()["state"] == "CANCELLED"

    cluster.fail_submit = True  # the cluster is down: the job stays QUEUED and is retried
    queued = client.post("/v1/jobs", json=SPEC, headers=_h(tokens["a"])).json()
    _reconcile(app, cluster)
    assert client.get(f"/v1/jobs/{queued['id']}", headers=_h(tokens["a"])).json()["state"] == "QUEUED"
    client.post(f"/v1/jobs/{queued['id']}/cancel", headers=_h(tokens["a"]))
    _reconcile(app, cluster)
    cluster.fail_submit = False
    assert client.get(f"/v1/jobs/{queued['id']}", headers=_h(tokens["a"])).json()["state"] == "CANCELLED"


def test_checkpoints_and_health(app_and_tokens):
    client, tokens, _, _ = app_and_tokens
    job = client.post("/v1/jobs", json=SPEC, headers=_h(tokens["a"])).json()
    r = client.get(f"/v1/jobs/{job['id']}/checkpoints", headers=_h(tokens["a"]))
    assert r.status_code == 200 and r.json()[0]["step"] == 50
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["checks"] == {"database": True, "ray": True, "mlflow": True, "s3": True}


def test_oversized_body_is_refused(app_and_tokens):
    client, tokens, *_ = app_and_tokens
    big = {**SPEC, "name": "x" * 5000}
    r = client.post(
        "/v1/jobs", content=json.dumps(big), headers={**_h(tokens["a"]), "Content-Type": "application/json"}
    )
    assert r.status_code == 413


def test_secrets_never_in_responses(app_and_tokens):
    client, tokens, *_ = app_and_tokens
    text = client.get("/v1/jobs", params={"limit": 200}, headers=_h(tokens["a"])).text
    assert tokens["a"] not in text and "S3_SECRET" not in text


def test_read_job_non_finite_metrics_are_null_as_the_openapi_schema_says(app_and_tokens):
    """Issue 15, finding 11: a NaN/inf progress metric is null in the response, and the schema says number | null."""
    import jsonschema

    client, tokens, cluster, app = app_and_tokens
    job = client.post("/v1/jobs", json=SPEC, headers=_h(tokens["a"])).json()
    _reconcile(app, cluster)
    cluster.ray_status[f"rcm-{job['id']}"] = ClusterJobStatus("RUNNING")
    cluster.progress[f"run-{job['id']}"] = {
        "step": 10.0,
        "loss": float("nan"),
        "scm_loss": float("inf"),
        "dmd_loss": 0.25,
    }
    _reconcile(app, cluster)
    r = client.get(f"/v1/jobs/{job['id']}", headers=_h(tokens["a"]))
    assert r.status_code == 200
    body = r.json()
    assert body["metrics"] == {"step": 10.0, "loss": None, "scm_loss": None, "dmd_loss": 0.25}
    doc = client.get("/openapi.json").json()
    jsonschema.validate(body, {"$ref": "#/components/schemas/JobPublic", "components": doc["components"]})
