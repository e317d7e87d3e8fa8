"""End to end against the real stack on loopback: SeaweedFS, MLflow, a Ray head with the Jobs API and the
API under uvicorn, all started by scripts/stack.py in a temporary data directory on free ports (beside a demo
stack, if one runs) and stopped by PID."""

import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import boto3
import httpx
import pytest

from rcm_client import RcmClient
from tests.service.realstack import running_stack

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
DEMO_PORTS = (8333, 5000, 8265, 8000, 6379, 10001)  # the demo stack's S3, MLflow, Ray Jobs API, API, GCS, client
API = MLFLOW = RAY = ""  # this module's stack, set by the `stack` fixture
INPUTS = "s3://ckpt/tenants/demo/"  # tenant "demo" (token "a"): its input prefix (service/inputs.py)
TEACHER = INPUTS + "e2e.safetensors"


def _hold_demo_ports(stack: ExitStack) -> list[int]:
    """Listen on the demo stack's fixed ports that are free, as a running `make demo` would."""
    held = []
    for port in DEMO_PORTS:
        s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue  # taken already (a demo stack may really be running): just as good
        s.listen()
        held.append(port)
    return held


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    global API, MLFLOW, RAY
    data = tmp_path_factory.mktemp("stack")
    started = running_stack(data)
    with ExitStack() as demo:  # the demo's ports are taken only while this stack starts
        _hold_demo_ports(demo)
        st = started.__enter__()
    try:
        API, MLFLOW, RAY = st.api, st.mlflow, st.ray
        teacher = data / "teacher.safetensors"  # a small real teacher, trained here in a few seconds
        subprocess.run(
            [
                sys.executable,
                "-m",
                "rcm_core.cli",
                "teacher",
                "train",
                "--set",
                "teacher.train_steps=400",
                "--out",
                str(data / "t"),
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=300,
        )
        next((data / "t" / "teachers").glob("*.safetensors")).rename(teacher)
        tokens = {"a": st.tokens["demo"], "b": st.create_token("other")}
        assert RcmClient(API, tokens["a"]).upload(teacher, "e2e.safetensors")["uri"] == TEACHER  # PUT /v1/inputs
        RcmClient(API, tokens["a"]).upload(_exploding_copy(teacher), "exploding.safetensors")
        yield {"data": data, "s3": st.s3, "tokens": tokens, "stack_cmd": st.cmd, "stack": st}
    finally:
        started.__exit__(None, None, None)


def test_stack_runs_on_free_ports_beside_a_demo_stack(stack):
    """The fixture started this stack while the demo's fixed ports were taken; every component answers."""
    st = stack["stack"]
    ports = {int(u.rsplit(":", 1)[1]) for u in (st.api, st.s3_url, st.mlflow, st.ray)}
    assert not ports & set(DEMO_PORTS), ports
    ready = httpx.get(f"{API}/readyz")
    assert ready.status_code == 200 and all(ready.json()["checks"].values()), ready.text
    assert httpx.get(f"{MLFLOW}/health").status_code == 200
    assert httpx.get(f"{RAY}/api/version").status_code == 200


def _exploding_copy(path: Path) -> Path:
    """A valid teacher whose output layer is scaled by 1e25: every rCM loss overflows float32 (a NaN/inf run)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    last = sorted(k for k in state if k.endswith("weight"))[-1]
    state[last] = state[last] * 1e25
    out = path.with_name("exploding.safetensors")
    save_file(state, str(out), metadata=meta)
    return out


def _h(token):
    return {"Authorization": f"Bearer {token}"}


def _spec(name, steps, **schedule):
    return {
        "name": name,
        "teacher": {"uri": TEACHER},
        "schedule": {"steps": steps, "batch_size": 64, "checkpoint_every": 20, "log_every": 5, **schedule},
    }


def _wait(token, job_id, pred, timeout=240):
    deadline, job = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            job = httpx.get(f"{API}/v1/jobs/{job_id}", headers=_h(token), timeout=5).json()
            if pred(job):
                return job
            if job["state"] == "FAILED" and not pred(job):
                pytest.fail(f"job failed: {job['failure_reason']}")
        except httpx.TransportError:
            pass  # the API may be restarting
        time.sleep(1)
    pytest.fail(f"timed out waiting on job {job_id}: {job}")


def _mlflow_run(job):
    run_id = job["mlflow_run_url"].rsplit("/", 1)[1]
    return run_id, httpx.get(f"{MLFLOW}/api/2.0/mlflow/runs/get", params={"run_id": run_id}).json()["run"]


def _succeed(token, spec, timeout=240):
    """Submit `spec`, wait for SUCCEEDED; returns (job, MLflow run id, run), the run FINISHED."""
    r = httpx.post(f"{API}/v1/jobs", json=spec, headers=_h(token))
    assert r.status_code == 202, r.text
    job = _wait(token, r.json()["id"], lambda j: j["state"] == "SUCCEEDED", timeout=timeout)
    run_id, run = _mlflow_run(job)
    assert run["info"]["status"] == "FINISHED"
    return job, run_id, run


def _export_report(stack, job) -> dict:
    """The job's exported report.json, parsed as strict JSON (no NaN / Infinity constants)."""
    body = stack["s3"].get_object(Bucket="ckpt", Key=f"jobs/{job['id']}/export/report.json")["Body"].read()
    return json.loads(body, parse_constant=_reject_non_json)


def _reject_non_json(name: str):
    raise AssertionError(f"report.json holds {name}, which is not JSON")


def test_submit_job_succeeds_with_metrics_samples_and_checkpoints(stack):
    tok = stack["tokens"]["a"]
    job, run_id, run = _succeed(tok, _spec("e2e-ok", 60, eval_every=30))
    assert job["step"] == 60 and "loss" in job["metrics"]
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"loss", "scm_loss", "dmd_loss", "step", "eval/1step/mode_coverage"} <= metrics
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["method.dmd_weight"] == "0.01"
    creds = (stack["data"] / "stack.env").read_text().split()
    assert not any(c.split("=", 1)[1] in str(run) for c in creds)  # no S3 keys in MLflow
    assert {"system/cpu_percent", "system/rss_mb", "eval/1step/sliced_w2"} <= metrics
    arts = httpx.get(f"{MLFLOW}/api/2.0/mlflow/artifacts/list", params={"run_id": run_id}).json()
    assert {"samples.png", "student.safetensors", "report.json", "samples"} <= {f["path"] for f in arts["files"]}
    periodic = httpx.get(f"{MLFLOW}/api/2.0/mlflow/artifacts/list", params={"run_id": run_id, "path": "samples"}).json()
    assert [f["path"] for f in periodic["files"]] == ["samples/step-0000030.png"]  # eval_every=30 of 60 steps
    ray_job = httpx.get(f"{RAY}/api/jobs/rcm-{job['id']}").text
    assert not any(c.split("=", 1)[1] in ray_job for c in creds)  # no S3 keys in Ray's job info either
    ckpts = httpx.get(f"{API}/v1/jobs/{job['id']}/checkpoints", headers=_h(tok)).json()
    assert [c["step"] for c in ckpts][-1] == 60 and len(ckpts) >= 3
    keys = [o["Key"] for o in stack["s3"].list_objects_v2(Bucket="ckpt", Prefix=f"ray/{job['id']}/")["Contents"]]
    assert any(k.endswith(".distcp") for k in keys) and any(k.endswith("manifest.json") for k in keys)
    # another tenant cannot see or cancel it
    other = stack["tokens"]["b"]
    assert httpx.get(f"{API}/v1/jobs/{job['id']}", headers=_h(other)).status_code == 404
    assert httpx.post(f"{API}/v1/jobs/{job['id']}/cancel", headers=_h(other)).status_code == 404


def test_time_budget_stops_training_and_still_exports(stack):
    """schedule.max_minutes: the job stops at the first log step past its budget, checkpoints, exports, SUCCEEDS."""
    tok = stack["tokens"]["a"]
    spec = _spec("e2e-budget", 1_000_000, checkpoint_every=1_000_000, eval_every=1_000_000, max_minutes=0.1)
    job, _, run = _succeed(tok, spec)
    ckpts = httpx.get(f"{API}/v1/jobs/{job['id']}/checkpoints", headers=_h(tok)).json()
    last = ckpts[-1]["step"]
    assert 0 < last < 1_000_000 and last % 5 == 0  # stopped at a log step, long before `steps`
    assert {m["key"]: m["value"] for m in run["data"]["metrics"]}.get("time_limit_reached") == 1.0
    assert _export_report(stack, job)["step"] == last


@pytest.mark.parametrize("uri", [INPUTS + "missing.safetensors", INPUTS + "garbage.safetensors"])
def test_unreadable_or_malformed_teacher_fails_with_a_reason(stack, uri):
    tok = stack["tokens"]["a"]
    httpx.put(f"{API}/v1/inputs/garbage.safetensors", content=b"not a safetensors file", headers=_h(tok))
    spec = {**_spec("e2e-bad-teacher", 10), "teacher": {"uri": uri}}
    job = httpx.post(f"{API}/v1/jobs", json=spec, headers=_h(tok)).json()
    done = _wait(tok, job["id"], lambda j: j["state"] == "FAILED", timeout=120)
    expected = "cannot read it" if "missing" in uri else "not a valid teacher file"
    assert expected in done["failure_reason"] and uri in done["failure_reason"]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (INPUTS + "bad.txt", f"data.prompt_file_uri {INPUTS}bad.txt, line 3: not a caption"),
        (INPUTS + "missing.txt", "cannot read it (no such object)"),
        ("nowhere/missing.txt", "no such file in the cluster's prompt directory"),
    ],
)
def test_malformed_or_missing_prompt_file_fails_with_a_reason(stack, uri, expected):
    bad = b"# two good captions, then one outside the grammar\na photo of a red circle\na photo of a dragon\n"
    tok = stack["tokens"]["a"]
    assert httpx.put(f"{API}/v1/inputs/bad.txt", content=bad, headers=_h(tok)).status_code == 201
    spec = {**_spec("e2e-bad-prompts", 10), "data": {"dataset": "shapes", "prompt_file_uri": uri}}
    r = httpx.post(f"{API}/v1/jobs", json=spec, headers=_h(tok))
    assert r.status_code == 202, r.text
    done = _wait(tok, r.json()["id"], lambda j: j["state"] == "FAILED", timeout=120)
    assert expected in done["failure_reason"], done["failure_reason"]
    assert "dragon" not in done["failure_reason"] and "/tmp" not in done["failure_reason"]  # no contents, no paths


def test_inputs_of_another_tenant_or_the_service_are_refused_before_any_read(stack):
    """Tenant "other" names tenant "demo"'s teacher, a job export and a checkpoint: 422 naming the field."""
    other = stack["tokens"]["b"]
    for uri in (TEACHER, "s3://ckpt/jobs/x/export/student.safetensors", "s3://ckpt/ray/x/checkpoint_1/a.distcp"):
        r = httpx.post(f"{API}/v1/jobs", json={**_spec("e2e-steal", 10), "teacher": {"uri": uri}}, headers=_h(other))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "teacher", "uri"], r.text
    assert httpx.get(f"{API}/v1/jobs", headers=_h(other)).json()["data"] == []


SHAPES_SPEC = {
    "name": "e2e-shapes",
    "teacher": {"uri": "builtin:shapes", "guidance_scale": 2.0},
    "data": {"dataset": "shapes"},
    "method": {"critic_ratio": 1},
    "schedule": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "eval_every": 2, "seed": 3},
    "eval": {"num_samples": 10, "diversity_samples": 2, "teacher_steps": [2]},
}


@pytest.fixture(scope="module")
def shapes_job(stack):
    """One worker on the shipped text-to-image teacher (builtin:shapes), a few CPU steps, a tiny evaluation."""
    return _succeed(stack["tokens"]["a"], SHAPES_SPEC, timeout=400)


def test_shapes_job_succeeds_with_sample_grids_and_report(stack, shapes_job):
    job, run_id, run = shapes_job
    assert job["step"] == 4 and "loss" in job["metrics"]
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"loss", "scm_loss", "dmd_loss", "eval/1step/overall", "eval/4step/diversity"} <= metrics
    arts = httpx.get(f"{MLFLOW}/api/2.0/mlflow/artifacts/list", params={"run_id": run_id}).json()
    assert {"samples.png", "student.safetensors", "report.json", "config.json"} <= {f["path"] for f in arts["files"]}
    periodic = httpx.get(f"{MLFLOW}/api/2.0/mlflow/artifacts/list", params={"run_id": run_id, "path": "samples"}).json()
    assert [f["path"] for f in periodic["files"]] == ["samples/step-0000002.png"]
    export = f"jobs/{job['id']}/export/"
    png = stack["s3"].get_object(Bucket="ckpt", Key=export + "samples.png")["Body"].read()
    assert png.startswith(b"\x89PNG")
    report = _export_report(stack, job)  # strict JSON: the stored teacher row has unmeasured cells
    rows = [(r["model"].split(" (")[0], r["steps"], r.get("stored", False)) for r in report["rows"]]
    assert rows == [("teacher", 50, True), ("teacher", 2, False)] + [("student", s, False) for s in (1, 2, 4)]
    assert all(0 <= r["overall"] <= 1 for r in report["rows"])
    # the stored spec is what the user sent; the effective config adds the shapes preset (issue 16)
    assert job["spec"] == SHAPES_SPEC
    eff = job["effective_config"]
    assert eff["method"]["critic_ratio"] == 1 and eff["method"]["lr"] == 1e-4  # set / the shapes preset's
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["method.lr"] == "0.0001" and params["teacher_source"] == "shipped"


# Context parallel vs one worker, same seed: the same rCM step on the same batch, token-sharded across 2 ranks
# (float32: only the order of sums differs). Losses: relative 1e-4. Evaluation scores are computed from images
# quantised to 8 bits and judged per object, so a last-bit difference could flip one of the 10 images: the
# GenEval-style scores must agree within 0.1 (one image of ten), measured equal on 2026-12-04.
LOSS_RTOL, SCORE_ATOL = 1e-4, 0.1


def test_context_parallel_shapes_job_matches_the_one_worker_job(stack, shapes_job):
    tok = stack["tokens"]["a"]
    one, one_run_id, one_run = shapes_job
    resources = {"num_workers": 2, "cp_degree": 2, "fsdp_degree": 1, "activation_checkpointing": "full"}
    job, run_id, run = _succeed(tok, {**SHAPES_SPEC, "name": "e2e-shapes-cp", "resources": resources}, timeout=500)
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["resources.cp_degree"] == "2" and params["resources.activation_checkpointing"] == "full"
    losses = {}
    for key in ("loss", "scm_loss", "dmd_loss"):
        cp = [m["value"] for m in sorted(_metric_history(run_id, key), key=lambda m: m["step"])]
        ref = [m["value"] for m in sorted(_metric_history(one_run_id, key), key=lambda m: m["step"])]
        losses[key] = {"cp": cp, "one": ref}
        assert len(cp) == len(ref) == 4, (key, cp, ref)
        for a, b in zip(cp, ref, strict=True):
            assert math.isclose(a, b, rel_tol=LOSS_RTOL), (key, cp, ref)
    print("e2e CP=2 vs 1 worker losses:", json.dumps(losses))
    scores = {m["key"]: m["value"] for m in run["data"]["metrics"] if m["key"].startswith("eval/")}
    ref_scores = {m["key"]: m["value"] for m in one_run["data"]["metrics"] if m["key"].startswith("eval/")}
    assert scores.keys() == ref_scores.keys() and "eval/1step/overall" in scores
    for key, value in scores.items():
        assert abs(value - ref_scores[key]) <= SCORE_ATOL, (key, value, ref_scores[key])
    print("e2e CP=2 vs 1 worker:", json.dumps({"cp": scores, "one": ref_scores}, sort_keys=True))
    ckpts = httpx.get(f"{API}/v1/jobs/{job['id']}/checkpoints", headers=_h(tok)).json()
    assert [c["step"] for c in ckpts] == [2, 4]


def test_non_finite_run_fails_naming_the_step_and_exports_nothing(stack):
    """A teacher whose outputs overflow: every rank detects the non-finite loss, the job FAILS (no Ray retries)
    with the step and the terms in its reason, writes no checkpoint of it and exports nothing."""
    tok = stack["tokens"]["a"]
    spec = {**_spec("e2e-nan", 20), "teacher": {"uri": INPUTS + "exploding.safetensors"}}
    job = httpx.post(f"{API}/v1/jobs", json=spec, headers=_h(tok)).json()
    done = _wait(tok, job["id"], lambda j: j["state"] == "FAILED", timeout=180)
    assert "non-finite training at step 1: " in done["failure_reason"], done["failure_reason"]
    assert "loss=" in done["failure_reason"] and done["recovery_count"] == 0
    assert httpx.get(f"{API}/v1/jobs/{job['id']}/checkpoints", headers=_h(tok)).json() == []
    exported = stack["s3"].list_objects_v2(Bucket="ckpt", Prefix=f"jobs/{job['id']}/export/").get("Contents", [])
    assert exported == []
    _, run = _mlflow_run(done)
    assert run["info"]["status"] == "FAILED"


def test_builtin_teacher_is_trained_once_and_shared(stack, monkeypatch):
    """builtin:toy2d: the first job's entrypoint trains the teacher and caches it in the stack's S3 under its
    content key; the next job's reuses it (same object, not rewritten), and a different config gets its own.

    Runs workers.entrypoint.resolve_teacher (what each job runs before Ray Train starts) in this process against
    the real SeaweedFS: the preset's teacher takes minutes on a 2-core CPU, so the specs shorten its training
    (teacher.train_steps, a worker-side field the REST schema does not expose)."""
    from workers.entrypoint import resolve_teacher
    from workers.spec import job_config

    creds = dict(line.split("=", 1) for line in (stack["data"] / "stack.env").read_text().split())
    monkeypatch.setenv("RCM_S3_ENDPOINT_URL", stack["stack"].s3_url)  # this stack's own (free) port
    monkeypatch.setenv("RCM_CHECKPOINT_BUCKET", "ckpt")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["S3_ACCESS_KEY"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["S3_SECRET_KEY"])
    # boto3's default session caches the first credentials it resolves in a process: an earlier test that ran the
    # worker's S3 code against another SeaweedFS would leave its keys there (InvalidAccessKeyId here).
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)

    def resolve(train_steps):
        spec = {"teacher": {"uri": "builtin:toy2d", "train_steps": train_steps}, "schedule": {"seed": 7}}
        uri, source = resolve_teacher(job_config(spec, output_dir="unused"))
        head = stack["s3"].head_object(Bucket="ckpt", Key=uri.removeprefix("s3://ckpt/"))
        return uri, source, (head["ETag"], head["LastModified"])

    first, second, other = resolve(60), resolve(60), resolve(61)
    assert (first[1], second[1], other[1]) == ("trained", "cached", "trained")
    assert second[0] == first[0] and second[2] == first[2]  # the same object, not rewritten
    assert first[0].startswith("s3://ckpt/teachers/builtin/toy2d-ring8-") and other[0] != first[0]


def test_two_worker_job_succeeds_with_sharded_checkpoints(stack):
    tok = stack["tokens"]["a"]
    spec = {
        **_spec("e2e-2workers", 20, checkpoint_every=10, eval_every=10),
        "resources": {"num_workers": 2, "fsdp_degree": 2},
    }
    job, run_id, run = _succeed(tok, spec, timeout=300)
    assert job["step"] == 20 and "loss" in job["metrics"]
    assert {"loss", "dmd_loss", "eval/1step/mode_coverage"} <= {m["key"] for m in run["data"]["metrics"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["resources.num_workers"] == "2" and params["resources.fsdp_degree"] == "2"
    steps = [m["step"] for m in _metric_history(run_id, "loss")]
    assert steps == sorted(set(steps)), steps  # one logger (rank 0): every step logged once
    ckpts = httpx.get(f"{API}/v1/jobs/{job['id']}/checkpoints", headers=_h(tok)).json()
    assert [c["step"] for c in ckpts] == [10, 20]
    keys = [o["Key"] for o in stack["s3"].list_objects_v2(Bucket="ckpt", Prefix=f"ray/{job['id']}/")["Contents"]]
    for c in ckpts:  # one DCP shard per rank, merged by Ray into one checkpoint, manifest written by rank 0
        prefix = c["uri"].removeprefix("s3://ckpt/") + "/"
        inside = [k.removeprefix(prefix) for k in keys if k.startswith(prefix)]
        assert sum(k.endswith(".distcp") for k in inside) == 2 and "manifest.json" in inside, inside
    exported = stack["s3"].list_objects_v2(Bucket="ckpt", Prefix=f"jobs/{job['id']}/export/")["Contents"]
    assert {"student.safetensors", "report.json", "config.json"} <= {o["Key"].rsplit("/", 1)[1] for o in exported}


def _metric_history(run_id, key):
    url = f"{MLFLOW}/api/2.0/mlflow/metrics/get-history"
    return httpx.get(url, params={"run_id": run_id, "metric_key": key}).json()["metrics"]


def test_cancel_job_ends_cancelled_with_a_final_checkpoint(stack):
    tok = stack["tokens"]["a"]
    job = httpx.post(
        f"{API}/v1/jobs", json=_spec("e2e-cancel", 100000, checkpoint_every=100000), headers=_h(tok)
    ).json()
    _wait(tok, job["id"], lambda j: j["state"] == "RUNNING" and j["step"] >= 10)
    assert httpx.post(f"{API}/v1/jobs/{job['id']}/cancel", headers=_h(tok)).json()["state"] == "CANCELLING"
    final = _wait(tok, job["id"], lambda j: j["state"] == "CANCELLED", timeout=120)
    ckpts = httpx.get(f"{API}/v1/jobs/{job['id']}/checkpoints", headers=_h(tok)).json()
    assert len(ckpts) == 1 and 10 <= ckpts[0]["step"] < 100000  # only the final one (the interval is never reached)
    _, run = _mlflow_run(final)
    assert run["info"]["status"] == "KILLED"


def test_kill_api_mid_job_keeps_state_and_history(stack):
    tok = stack["tokens"]["a"]
    job = httpx.post(f"{API}/v1/jobs", json=_spec("e2e-restart", 120), headers=_h(tok)).json()
    _wait(tok, job["id"], lambda j: j["state"] == "RUNNING")
    before = httpx.get(f"{API}/v1/jobs/{job['id']}/events", headers=_h(tok)).json()
    pid = int((stack["data"] / "pids" / "api.pid").read_text())
    os.killpg(pid, signal.SIGKILL)
    time.sleep(1)
    up = stack["stack_cmd"]("up")  # restarts only what is down
    assert up.returncode == 0, up.stdout + up.stderr
    after = httpx.get(f"{API}/v1/jobs/{job['id']}/events", headers=_h(tok)).json()
    assert after[: len(before)] == before
    done = _wait(tok, job["id"], lambda j: j["state"] == "SUCCEEDED")
    assert done["step"] == 120


def test_kill_train_worker_mid_run_recovers_from_checkpoint(stack):
    tok = stack["tokens"]["a"]
    job = httpx.post(f"{API}/v1/jobs", json=_spec("e2e-recover", 140), headers=_h(tok)).json()
    _wait(tok, job["id"], lambda j: j["state"] == "RUNNING" and j["step"] >= 45)
    ps = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True)
    pids = [int(p) for p in ps.stdout.split()]
    assert pids, "no Ray Train worker process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    done = _wait(tok, job["id"], lambda j: j["state"] == "SUCCEEDED", timeout=300)
    assert done["recovery_count"] >= 1 and done["step"] == 140
    run_id, _ = _mlflow_run(done)

    def history(key):
        url = f"{MLFLOW}/api/2.0/mlflow/metrics/get-history"
        return httpx.get(url, params={"run_id": run_id, "metric_key": key}).json()["metrics"]

    # The resumed worker logs recovery_count >= 1 at the step it resumed from; every step logged before that
    # moment was reached by the killed worker. What was lost is the difference.
    resumed = min((m for m in history("recovery_count") if m["value"] >= 1), key=lambda m: m["timestamp"])
    reached = max(m["value"] for m in history("step") if m["timestamp"] < resumed["timestamp"])
    assert 0 <= reached - resumed["step"] <= 20  # at most one checkpoint interval (20 steps) lost


def test_rcm_client_submits_follows_and_cancels_jobs(stack, tmp_path):
    """The `rcm` job commands (rcm_client, no rcm_core inside) against the live API: submit, list, status,
    follow the events to the end, bad input (one line, exit 2), cancel."""
    tok = stack["tokens"]["a"]
    env = {**os.environ, "RCM_API_URL": API, "RCM_API_TOKEN": tok}

    def rcm(*args, timeout=300):
        cmd = [sys.executable, "-m", "rcm_client.cli", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    spec = tmp_path / "job.yaml"
    spec.write_text(
        "name: e2e-client\nteacher: {uri: " + TEACHER + "}\n"
        "schedule: {steps: 10, batch_size: 32, checkpoint_every: 10, log_every: 5, eval_every: 10}\n"
    )
    out = rcm("submit", str(spec))
    assert out.returncode == 0, out.stderr
    job_id, state = out.stdout.split()
    assert state == "QUEUED"
    assert job_id in rcm("jobs").stdout
    logs = rcm("logs", "-f", job_id)  # follows the server-sent events until the job ends
    assert logs.returncode == 0 and "step 10" in logs.stdout and "SUCCEEDED" in logs.stdout, logs.stdout
    status = json.loads(rcm("status", job_id).stdout)
    assert status["state"] == "SUCCEEDED" and status["effective_config"]["schedule"]["steps"] == 10
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "teacher": {"uri": "http://nope"}}))
    out = rcm("submit", str(bad))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "teacher.uri" in out.stderr, out.stderr
    out = rcm("cancel", job_id)  # already finished: 409, one line
    assert out.returncode == 2 and "already SUCCEEDED" in out.stderr
    long = tmp_path / "long.json"
    long.write_text(json.dumps({**_spec("e2e-client-cancel", 100000, checkpoint_every=100000)}))
    job_id = rcm("submit", str(long)).stdout.split()[0]
    _wait(tok, job_id, lambda j: j["state"] == "RUNNING")
    out = rcm("cancel", job_id)
    assert out.returncode == 0 and out.stdout.split() == [job_id, "CANCELLING"]
    _wait(tok, job_id, lambda j: j["state"] == "CANCELLED", timeout=120)


# -- a diffusers teacher (issue 17, item 5): a tiny random Wan2.1 T2V transformer saved with save_pretrained ----------
WAN_FOLDER = INPUTS + "wan-tiny/transformer/"
WAN_SPEC = {
    "name": "e2e-wan",
    "teacher": {"uri": WAN_FOLDER},  # family read from config.json (WanTransformer3DModel -> wan2.1)
    "data": {
        "dataset": "teacher-synthetic",
        "latent_shape": [4, 2, 4, 4],  # 2 x 2 x 2 = 8 tokens after patch (1, 2, 2): 4 per rank at cp_degree 2
        "text_tokens": 6,
        "num_prompts": 4,
        "sample_steps": 2,
    },
    "method": {"critic_ratio": 1},
    "resources": {"num_workers": 2, "cp_degree": 2, "fsdp_degree": 1},
    "schedule": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "eval_every": 2, "seed": 5},
    "eval": {"num_samples": 10, "teacher_steps": [4]},
    # issue 18 item 4: a sharded diffusers export, registered as a new version of tenant demo's model
    "export": {"registered_model_name": "demo.wan-e2e", "max_shard_size": "40KB"},
}


@pytest.fixture(scope="module")
def wan_teacher(stack, tmp_path_factory):
    """The tiny Wan saved in shards with an index (as large checkpoints are), uploaded as a folder (PUT /v1/inputs)."""
    from tests.teachers.wan_tiny import save_wan_tiny

    folder = save_wan_tiny(tmp_path_factory.mktemp("wan") / "transformer", max_shard_size="40KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    out = RcmClient(API, stack["tokens"]["a"]).upload_folder(folder, "wan-tiny/transformer")
    assert out["uri"] == WAN_FOLDER
    return folder


def test_wan_teacher_job_with_context_parallel_succeeds_and_exports_a_diffusers_student(stack, wan_teacher, tmp_path):
    """A tiny Wan teacher, 2 workers at cp_degree 2: the job succeeds with its metrics, checkpoints and report; the
    student is exported in diffusers layout (sharded, manifest last, model card, sampler record), reloaded by
    from_pretrained it reproduces the job's own evaluation samples (in this process and through `rcm sample`
    reading the export from S3), and it is a new version of the spec's model in MLflow's Model Registry."""
    import torch
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from rcm_core.export import sample_student
    from rcm_core.models.flow import FlowModel
    from rcm_core.teachers.wan import WanNet

    tok = stack["tokens"]["a"]
    job, run_id, run = _succeed(tok, WAN_SPEC, timeout=500)
    assert job["step"] == 4 and "loss" in job["metrics"]
    eff = job["effective_config"]  # the family's preset: Wan's guidance 5, the published recipe's lr
    assert eff["teacher"]["family"] == "wan2.1" and eff["teacher"]["guidance_scale"] == 5.0
    assert eff["method"]["lr"] == 2e-6 and eff["resources"]["cp_degree"] == 2
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"loss", "scm_loss", "dmd_loss", "eval/1step/rel_l2", "eval/4step/mse"} <= metrics
    periodic = [m["step"] for m in _metric_history(run_id, "eval/1step/rel_l2")]
    assert periodic == [2, 4], periodic  # eval_every=2, then the final report
    ckpts = httpx.get(f"{API}/v1/jobs/{job['id']}/checkpoints", headers=_h(tok)).json()
    assert [c["step"] for c in ckpts] == [2, 4]
    keys = [o["Key"] for o in stack["s3"].list_objects_v2(Bucket="ckpt", Prefix=f"ray/{job['id']}/")["Contents"]]
    for c in ckpts:  # one DCP shard per rank (2 ranks), merged by Ray; the manifest written once both are there
        prefix = c["uri"].removeprefix("s3://ckpt/") + "/"
        inside = [k.removeprefix(prefix) for k in keys if k.startswith(prefix)]
        assert sum(k.endswith(".distcp") for k in inside) == 2 and "manifest.json" in inside, inside
    report = _export_report(stack, job)
    rows = [(r["model"].split(" (")[0], r["steps"]) for r in report["rows"]]
    assert rows == [("teacher", 4)] + [("student", s) for s in (1, 2, 4)]
    assert all(math.isfinite(r["rel_l2"]) and r["rel_l2"] >= 0 for r in report["rows"])
    # the student in diffusers layout, manifest last: every file it lists is there with its size
    prefix = f"jobs/{job['id']}/export/"
    manifest = json.loads(stack["s3"].get_object(Bucket="ckpt", Key=prefix + "manifest.json")["Body"].read())
    stored = {
        o["Key"].removeprefix(prefix): o["Size"]
        for o in stack["s3"].list_objects_v2(Bucket="ckpt", Prefix=prefix)["Contents"]
    }
    assert stored == {**manifest["files"], "manifest.json": stored["manifest.json"]}
    names = set(manifest["files"])
    assert {"README.md", "rcm.json", "scheduler/scheduler_config.json", "samples.safetensors"} <= names
    assert "transformer/diffusion_pytorch_model.safetensors.index.json" in names  # sharded at 40KB
    export = tmp_path / "export"
    for name in names:
        (export / name).parent.mkdir(parents=True, exist_ok=True)
        (export / name).write_bytes(stack["s3"].get_object(Bucket="ckpt", Key=prefix + name)["Body"].read())
    card = (export / "README.md").read_text()
    assert job["id"] in card and WAN_FOLDER in card and "eval/4step/rel_l2" in card
    assert hashlib.sha256((wan_teacher / "config.json").read_bytes()).hexdigest() in card
    # from_pretrained loads it, with the teacher's keys and trained weights
    student = WanTransformer3DModel.from_pretrained(str(export), subfolder="transformer")
    teacher = WanTransformer3DModel.from_pretrained(str(wan_teacher))
    s_state, t_state = student.state_dict(), teacher.state_dict()
    assert s_state.keys() == t_state.keys()
    assert any(not (s_state[k] == t_state[k]).all() for k in t_state)  # trained, not the teacher copied
    # ... and with the recorded few-step sampler it gives the job's own evaluation samples (1, 2 and 4 steps)
    evaluated = load_file(str(export / "samples.safetensors"))
    record = json.loads((export / "scheduler" / "scheduler_config.json").read_text())["rcm"]
    net = FlowModel(WanNet.from_diffusers(student), "rf").eval()
    cond = {"tokens": evaluated["tokens"], "mask": evaluated["mask"]}
    for steps in (1, 2, 4):
        times = record["schedules"][str(steps)]["trigflow_times"]
        x = sample_student(net, cond, evaluated["noise"], times, record["eval_seed"])
        torch.testing.assert_close(x, evaluated[f"student_{steps}step"], rtol=1e-5, atol=1e-5)
    # `rcm sample` straight from S3 reproduces the 4-step samples too (the eval's embeddings + noise as input)
    creds = stack["stack"].creds
    env = {**os.environ, "RCM_S3_ENDPOINT_URL": stack["stack"].s3_url, "AWS_ACCESS_KEY_ID": creds["S3_ACCESS_KEY"]}
    env["AWS_SECRET_ACCESS_KEY"] = creds["S3_SECRET_KEY"]
    cmd = [sys.executable, "-m", "rcm_client.cli", "sample", "--student", f"s3://ckpt/{prefix}", "--steps", "4"]
    cmd += ["--prompt-embeds", str(export / "samples.safetensors"), "--out", str(tmp_path / "sampled")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    latents = load_file(str(tmp_path / "sampled" / "latents.safetensors"))["latents"]
    torch.testing.assert_close(latents, evaluated["student_4step"], rtol=1e-5, atol=1e-5)
    # registered in the MLflow Model Registry as a new version of the named model, with lineage tags
    r = httpx.get(
        f"{MLFLOW}/api/2.0/mlflow/model-versions/search", params={"filter": "name='demo.wan-e2e'"}
    ).raise_for_status()
    (version,) = r.json()["model_versions"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert version["source"] == f"s3://ckpt/{prefix}" and version["run_id"] == run_id
    assert tags["rcm.job_id"] == job["id"] and tags["rcm.teacher"] == WAN_FOLDER
    assert tags["rcm.teacher_config_sha256"] in card and "teacher-synthetic" in tags["rcm.dataset"]


def test_wan_teacher_folder_the_job_cannot_use_is_refused_with_the_field(stack, wan_teacher, tmp_path):
    """Against the stack's own SeaweedFS: a folder without config.json, an unsupported class, a family that
    disagrees and a cp_degree the heads do not divide are 422s naming the field; nothing is queued."""
    tok = stack["tokens"]["a"]
    client = RcmClient(API, tok)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights the API never reads")
    client.upload_folder(tmp_path / "unet", "unet/transformer")
    client.upload(wan_teacher / "diffusion_pytorch_model.safetensors.index.json", "no-config/x.safetensors.index.json")
    before = httpx.get(f"{API}/v1/jobs", headers=_h(tok)).json()["data"]
    cases = [
        ({"teacher": {"uri": INPUTS + "no-config/"}}, ["body", "teacher", "uri"], "not a diffusers transformer folder"),
        ({"teacher": {"uri": INPUTS + "unet/transformer/"}}, ["body", "teacher", "uri"], "is not a supported one"),
        ({"teacher": {"uri": WAN_FOLDER, "family": "cosmos-predict2"}}, ["body", "teacher", "family"], "wan2.1"),
        (
            {"resources": {"num_workers": 4, "cp_degree": 4, "fsdp_degree": 1}},
            ["body", "resources", "cp_degree"],
            "num_attention_heads (2) is not divisible by cp_degree (4)",
        ),
    ]
    for change, loc, expected in cases:
        r = httpx.post(f"{API}/v1/jobs", json={**WAN_SPEC, **change}, headers=_h(tok))
        assert r.status_code == 422, r.text
        assert any(e["loc"] == loc and expected in e["msg"] for e in r.json()["detail"]), r.text
    assert httpx.get(f"{API}/v1/jobs", headers=_h(tok)).json()["data"] == before


# -- a stored dataset (issue 18, items 1 + 3): rcm-latents-v1 shards written into SeaweedFS under the tenant prefix ---
DATASET = INPUTS + "datasets/wan-e2e/"


def _write_dataset(stack, uri, *, text_dim=24, count=12):
    """`count` samples for the tiny Wan (latent (4, 2, 4, 4), 6 x text_dim tokens) through ShardWriter over pyarrow's
    S3 filesystem: shards of 4 in row groups of 2 (so that 2 data-parallel workers get equal shares)."""
    import pyarrow.fs as pafs
    import torch

    from rcm_core.data.latent_shards import ShardWriter

    creds, (scheme, _, host) = stack["stack"].creds, stack["stack"].s3_url.partition("://")
    fs = pafs.S3FileSystem(
        endpoint_override=host,
        scheme=scheme,
        access_key=creds["S3_ACCESS_KEY"],
        secret_key=creds["S3_SECRET_KEY"],
        region="us-east-1",
    )
    gen = torch.Generator().manual_seed(3)
    root = uri.removeprefix("s3://").rstrip("/")
    with ShardWriter(
        fs, root, text_tokens=6, text_dim=text_dim, latent_shape=(4, 2, 4, 4), samples_per_shard=4, row_group_size=2
    ) as w:
        for i in range(count):
            tokens = torch.randn(6, text_dim, generator=gen)
            w.add(f"k{i:03d}", f"caption {i}", tokens, 2 + i % 4, torch.randn(4, 2, 4, 4, generator=gen))


def _data_positions(stack, checkpoint_uri: str, tmp_path: Path):
    """The data readers' positions (one (epoch, emitted) row per data-parallel rank) in a job's DCP checkpoint."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    prefix = checkpoint_uri.removeprefix("s3://ckpt/") + "/"
    local = tmp_path / prefix.strip("/").replace("/", "_")
    for obj in stack["s3"].list_objects_v2(Bucket="ckpt", Prefix=prefix)["Contents"]:
        if obj["Key"].endswith("/"):  # a folder marker, not a file of the checkpoint
            continue
        dest = local / obj["Key"].removeprefix(prefix)
        dest.parent.mkdir(parents=True, exist_ok=True)
        stack["s3"].download_file("ckpt", obj["Key"], str(dest))
    dcp_to_torch_save(str(local), str(local / "all.pt"))
    return torch.load(local / "all.pt", weights_only=False)["app"]["data_position"].tolist()


def test_wan_job_on_a_stored_dataset_succeeds_with_two_data_parallel_readers(stack, wan_teacher, tmp_path):
    """`data: {"uri": ...}` alone: the manifest is checked at submission, the 2 workers (data parallel) each stream
    their own share from SeaweedFS, and every checkpoint records both readers' positions."""
    tok = stack["tokens"]["a"]
    _write_dataset(stack, DATASET)
    spec = {
        "name": "e2e-wan-dataset",
        "teacher": {"uri": WAN_FOLDER},
        "data": {"uri": DATASET, "shuffle_buffer": 3},
        "method": {"critic_ratio": 1},
        "resources": {"num_workers": 2, "fsdp_degree": 2},  # two data-parallel readers
        "schedule": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "seed": 5},
        "eval": {"num_samples": 10, "teacher_steps": [2]},
    }
    job, _, run = _succeed(tok, spec, timeout=500)
    assert job["step"] == 4 and job["spec"]["data"] == {"uri": DATASET, "shuffle_buffer": 3, "dataset": "latents"}
    eff = job["effective_config"]["data"]  # the manifest's shapes, not the spec's
    assert eff["dataset"] == "latents" and eff["latent_shape"] == [4, 2, 4, 4] and eff["text_tokens"] == 6
    assert {"loss", "scm_loss", "dmd_loss", "eval/1step/rel_l2"} <= {m["key"] for m in run["data"]["metrics"]}
    ckpts = httpx.get(f"{API}/v1/jobs/{job['id']}/checkpoints", headers=_h(tok)).json()
    # a step draws 2 batches (critic, student) of 2 = 1 sample per rank each; 12 samples in 6 row groups of 2 give
    # each rank a share of 6 a epoch: step 2 -> 4 read (epoch 0), step 4 -> 8 = the whole share + 2 of epoch 1
    positions = {c["step"]: _data_positions(stack, c["uri"], tmp_path) for c in ckpts}
    assert positions == {2: [[0, 4], [0, 4]], 4: [[1, 2], [1, 2]]}, positions
    export = f"jobs/{job['id']}/export/transformer/diffusion_pytorch_model.safetensors"
    assert stack["s3"].head_object(Bucket="ckpt", Key=export)["ContentLength"] > 0


def test_stored_dataset_the_teacher_cannot_use_is_refused_with_the_field(stack, wan_teacher):
    """Against SeaweedFS: a manifest whose text dim is not the teacher's, and a folder without a manifest, are 422s
    naming data.uri; nothing is queued."""
    tok = stack["tokens"]["a"]
    _write_dataset(stack, INPUTS + "datasets/umt5-width/", text_dim=32, count=2)
    before = httpx.get(f"{API}/v1/jobs", headers=_h(tok)).json()["data"]
    cases = [
        (
            INPUTS + "datasets/umt5-width/",
            "the dataset's text.dim is 32 (its manifest.json), but the teacher's text_dim",
        ),
        (INPUTS + "datasets/none/", "no manifest.json under it"),
    ]
    for uri, expected in cases:
        spec = {"name": "x", "teacher": {"uri": WAN_FOLDER}, "data": {"uri": uri}, "schedule": {"batch_size": 2}}
        r = httpx.post(f"{API}/v1/jobs", json=spec, headers=_h(tok))
        assert r.status_code == 422, r.text
        assert any(e["loc"] == ["body", "data", "uri"] and expected in e["msg"] for e in r.json()["detail"]), r.text
    assert httpx.get(f"{API}/v1/jobs", headers=_h(tok)).json()["data"] == before


# -- sample previews and dataset preparation on the cluster (issue 18, items 5 and 2) -------------------------------
def test_samples_of_a_finished_shapes_job_are_a_grid_from_its_latest_checkpoint(stack, shapes_job, tmp_path):
    """POST /v1/jobs/{id}/samples on the finished shapes job: queued as Ray jobs (a third while two are pending is a
    429), bounds and another tenant refused, a job without a checkpoint a 409; the grid PNG and the images come back
    through the API and equal the EMA student of the job's newest checkpoint sampled here."""
    import torch
    from PIL import Image
    from safetensors.torch import load

    from rcm_core import preview
    from rcm_core.models.flow import FlowModel
    from rcm_core.tasks import get_task
    from workers.spec import job_config

    tok, other = stack["tokens"]["a"], stack["tokens"]["b"]
    job = shapes_job[0]
    url = f"{API}/v1/jobs/{job['id']}/samples"
    captions = ["a photo of a red circle", "a photo of two squares"]
    r = httpx.post(url, json={"prompts": captions}, headers=_h(other))
    assert r.status_code == 404, r.text  # another tenant's job does not exist
    r = httpx.post(url, json={"prompts": captions * 9, "steps": 9}, headers=_h(tok))
    assert r.status_code == 422 and {tuple(e["loc"]) for e in r.json()["detail"]} == {
        ("body", "prompts"),
        ("body", "steps"),
    }, r.text
    client = RcmClient(API, tok)
    first = client.samples(job["id"], prompts=captions, steps=2, num_samples=3, seed=11)
    second = client.samples(job["id"], prompts=["a photo of a purple hexagon"], steps=1, num_samples=1)
    assert first["state"] == second["state"] == "QUEUED"
    r = httpx.post(url, json={"prompts": captions}, headers=_h(tok))  # both still pending (a worker takes seconds)
    assert r.status_code == 429 and "queued or running" in r.json()["detail"], r.text
    done = client.wait_sample(job["id"], first["id"], timeout=300)
    assert done["state"] == "SUCCEEDED", done
    failed = client.wait_sample(job["id"], second["id"], timeout=300)  # not a caption of the grammar
    assert failed["state"] == "FAILED" and "prompts[0]" in failed["failure_reason"], failed
    # a shapes job that fails at its start (its teacher is not there) never has a checkpoint
    no_ckpt = {**SHAPES_SPEC, "name": "e2e-no-ckpt", "teacher": {"uri": INPUTS + "gone.safetensors"}}
    bad = httpx.post(f"{API}/v1/jobs", json=no_ckpt, headers=_h(tok)).json()
    r = httpx.post(f"{API}/v1/jobs/{bad['id']}/samples", json={"prompts": captions}, headers=_h(tok))
    assert r.status_code == 409 and "has no checkpoint yet" in r.json()["detail"], r.text
    checkpoints = client.checkpoints(job["id"])
    assert done["step"] == checkpoints[-1]["step"] == 4
    png = client.sample_file(job["id"], first["id"], "grid.png")
    grid = Image.open(__import__("io").BytesIO(png))
    assert grid.format == "PNG" and grid.size[1] == 2 * (32 * 3 + 4)  # one row per caption
    images = load(client.sample_file(job["id"], first["id"], "samples.safetensors"))["images"]
    assert images.shape == (6, 32, 32, 3) and images.dtype == torch.uint8 and images.float().std() > 0
    assert httpx.get(f"{url}/{first['id']}/grid.png", headers=_h(other)).status_code == 404
    # the same preview here, from the newest checkpoint in S3: the worker sampled that checkpoint's EMA student
    prefix = checkpoints[-1]["uri"].removeprefix("s3://ckpt/") + "/"
    local = tmp_path / "ckpt"
    for obj in stack["s3"].list_objects_v2(Bucket="ckpt", Prefix=prefix)["Contents"]:
        if not obj["Key"].endswith("/"):
            (local / obj["Key"].removeprefix(prefix)).parent.mkdir(parents=True, exist_ok=True)
            stack["s3"].download_file("ckpt", obj["Key"], str(local / obj["Key"].removeprefix(prefix)))
    cfg = job_config(SHAPES_SPEC, output_dir=str(tmp_path / "run")).distill
    net, meta = get_task("shapes").builtin_teacher(cfg)
    model = preview.load_ema_student(local, net, meta["parameterization"])
    mine, _ = preview.shapes_grid(model, cfg, captions, num_samples=3, steps=2, seed=11)
    assert (mine.int() - images.int()).abs().max() <= 1  # uint8 images; threads may order float sums differently
    teacher = FlowModel(net, meta["parameterization"]).eval()
    teacher_like, _ = preview.shapes_grid(teacher, cfg, captions, num_samples=3, steps=2, seed=11)
    assert (teacher_like.int() - images.int()).abs().max() > 1  # not the teacher's weights: the student's


def test_dataset_prepared_on_the_cluster_is_a_data_uri_a_job_accepts(stack, wan_teacher, tmp_path):
    """POST /v1/datasets with a tiny random Wan pipeline (UMT5 encoder, Wan VAE, the tiny transformer) uploaded to the
    tenant's inputs: `rcm data prepare --synthesize` runs as a Ray job, the manifest appears under the tenant's
    datasets/<name>/, the same name again is a 409, a foreign URI a 422, and a job takes the URI as data.uri."""
    from tests.teachers.pipeline_tiny import save_wan_pipeline

    tok = stack["tokens"]["a"]
    client = RcmClient(API, tok)
    pipeline = client.upload_folder(save_wan_pipeline(tmp_path / "wan-pipe"), "wan-pipe", recursive=True)["uri"]
    assert pipeline == INPUTS + "wan-pipe/"
    (tmp_path / "prompts.txt").write_text("a red cat on the mat\na big dog runs\na small blue sky\n")
    prompts = client.upload(tmp_path / "prompts.txt", "prep-prompts.txt")["uri"]
    request = {
        "name": "wan-synth",
        "prompts": {"uri": prompts},
        "pipeline": {"uri": pipeline},
        "synthesize": True,
        "latent_shape": [4, 2, 4, 4],
        "steps": 2,
        "max_sequence_length": 6,
        "samples_per_shard": 2,
    }
    r = httpx.post(f"{API}/v1/datasets", json={**request, "prompts": {"uri": "s3://ckpt/tenants/other/p.txt"}},
                   headers=_h(tok))  # fmt: skip
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompts", "uri"], r.text
    queued = client.create_dataset(request)
    assert queued["state"] == "QUEUED" and queued["uri"] == INPUTS + "datasets/wan-synth/"
    r = httpx.post(f"{API}/v1/datasets", json=request, headers=_h(tok))
    assert r.status_code == 409, r.text  # being prepared
    deadline = time.monotonic() + 300
    while (ds := client.dataset("wan-synth"))["state"] not in ("SUCCEEDED", "FAILED") and time.monotonic() < deadline:
        time.sleep(1)
    assert ds["state"] == "SUCCEEDED" and ds["count"] == 3, ds
    key = "tenants/demo/datasets/wan-synth/manifest.json"
    manifest = json.loads(stack["s3"].get_object(Bucket="ckpt", Key=key)["Body"].read())
    assert manifest["count"] == 3 and manifest["latent"]["shape"] == [4, 2, 4, 4] and manifest["text"]["dim"] == 24
    assert manifest["extra"]["latents"] == "teacher" and len(manifest["shards"]) == 2
    r = httpx.post(f"{API}/v1/datasets", json=request, headers=_h(tok))
    assert r.status_code == 409 and "already holds files" in r.json()["detail"], r.text  # nothing overwritten
    spec = {"name": "e2e-on-prepared", "teacher": {"uri": WAN_FOLDER}, "data": {"uri": ds["uri"]},
            "schedule": {"steps": 1, "batch_size": 1}}  # fmt: skip
    r = httpx.post(f"{API}/v1/jobs", json=spec, headers=_h(tok))
    assert r.status_code == 202 and r.json()["spec"]["data"]["uri"] == ds["uri"], r.text  # the manifest checks passed
    httpx.post(f"{API}/v1/jobs/{r.json()['id']}/cancel", headers=_h(tok))
    _wait(tok, r.json()["id"], lambda j: j["state"] in ("CANCELLED", "SUCCEEDED"), timeout=240)
