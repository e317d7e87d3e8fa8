"""Sample previews (`POST /v1/jobs/{id}/samples`) and dataset preparation (`POST /v1/datasets`), issue 18 items 5
and 2, at the API: the real app and SQLite store with the cluster swapped for a fake (what is submitted to Ray, and
what S3 holds, are the test's). Tenant scoping (404 for another tenant's job, 422 for a URI outside the caller's
prefix, checked before anything is read), bounds (422 with field paths, 429 past the pending cap), 409 without a
checkpoint or over an existing dataset, and the state read back from Ray + the outputs from S3. The same against the
real stack and workers: tests/service/test_e2e_stack.py."""

import json

import pytest

from service.cluster import ClusterJobStatus
from tests.service import test_jobs_api

app_and_tokens = test_jobs_api.app_and_tokens  # the API unit tests' app (real app + SQLite, fake cluster)
SHAPES = {"name": "shapes", "teacher": {"uri": "builtin:shapes"}, "data": {"dataset": "shapes"}}
WAN = {"name": "wan", "teacher": {"uri": "s3://ckpt/tenants/tenant-a/wan/"}, "data": {"dataset": "teacher-synthetic"}}
OWN = "s3://ckpt/tenants/tenant-a/"


def _h(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def jobs(app_and_tokens):
    """A shapes job and a diffusers (Wan) job of tenant-a, each with an effective config and a checkpoint."""
    client, tokens, cluster, _ = app_and_tokens
    cluster.objects[("ckpt", "tenants/tenant-a/wan/config.json")] = json.dumps(
        {"_class_name": "WanTransformer3DModel", "in_channels": 4, "patch_size": [1, 2, 2], "num_attention_heads": 2,
         "attention_head_dim": 8, "text_dim": 24}
    ).encode()  # fmt: skip
    cluster.objects[("ckpt", "tenants/tenant-a/wan/diffusion_pytorch_model.safetensors")] = b"w"
    cluster.objects[("ckpt", "tenants/tenant-a/embeds.safetensors")] = b"e" * 100
    out = {}
    for key, spec in (("shapes", SHAPES), ("wan", {**WAN, "data": {**WAN["data"], "latent_shape": [4, 2, 4, 4]}})):
        r = client.post("/v1/jobs", json=spec, headers=_h(tokens["a"]))
        assert r.status_code == 202, r.text
        out[key] = r.json()["id"]
        cluster.effective[out[key]] = {"teacher": {"uri": spec["teacher"]["uri"], "family": "wan2.1" * (key == "wan")}}
    return out


def _post(client, token, job_id, body):
    return client.post(f"/v1/jobs/{job_id}/samples", json=body, headers=_h(token))


def test_create_samples_of_another_tenants_job_is_404(app_and_tokens, jobs):
    client, tokens, cluster, _ = app_and_tokens
    before = list(cluster.tasks)
    r = _post(client, tokens["b"], jobs["shapes"], {"prompts": ["a photo of a red circle"]})
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    assert cluster.tasks == before


@pytest.mark.parametrize(
    ("job", "body", "loc", "expected"),
    [
        ("shapes", {"prompts": ["a photo of a cat"] * 17}, ["body", "prompts"], "at most 16"),
        ("shapes", {"prompts": ["x"], "steps": 9}, ["body", "steps"], "less than or equal to 8"),
        ("shapes", {"prompts": ["x"], "num_samples": 0}, ["body", "num_samples"], "greater than or equal to 1"),
        ("shapes", {"prompts": ["x" * 301]}, ["body", "prompts", 0], "at most 300"),
        ("shapes", {}, ["body"], "give either prompts"),
        ("shapes", {"prompt_embeds_uri": OWN + "embeds.safetensors"}, ["body", "prompt_embeds_uri"], "takes captions"),
        ("wan", {"prompts": ["a cat"]}, ["body", "prompt_embeds_uri"], "takes encoded prompts"),
        (
            "wan",
            {"prompt_embeds_uri": "s3://ckpt/tenants/tenant-b/embeds.safetensors"},
            ["body", "prompt_embeds_uri"],
            "under your input prefix",
        ),
        ("wan", {"prompt_embeds_uri": OWN + "none.safetensors"}, ["body", "prompt_embeds_uri"], "no such input"),
    ],
)
def test_create_samples_with_bad_input_is_422_naming_the_field(app_and_tokens, jobs, job, body, loc, expected):
    client, tokens, cluster, _ = app_and_tokens
    before = list(cluster.tasks)
    r = _post(client, tokens["a"], jobs[job], body)
    assert r.status_code == 422, r.text
    assert any(e["loc"] == loc and expected in e["msg"] for e in r.json()["detail"]), r.text
    assert cluster.tasks == before  # nothing queued


def test_create_samples_before_any_checkpoint_is_409(app_and_tokens, jobs):
    client, tokens, cluster, _ = app_and_tokens
    cluster.no_checkpoints.add(jobs["shapes"])
    try:
        r = _post(client, tokens["a"], jobs["shapes"], {"prompts": ["a photo of a red circle"]})
    finally:
        cluster.no_checkpoints.discard(jobs["shapes"])
    assert r.status_code == 409 and "has no checkpoint yet" in r.json()["detail"]


def test_create_samples_queues_a_ray_job_then_reports_state_and_files(app_and_tokens, jobs):
    """Two requests queue (the cap); a third is 429 until one ends; a succeeded one lists its files from S3 and
    serves them; a failed one carries the worker's reason."""
    client, tokens, cluster, _ = app_and_tokens
    body = {"prompts": ["a photo of a red circle"], "steps": 2, "num_samples": 3, "seed": 7}
    first = _post(client, tokens["a"], jobs["shapes"], body)
    assert first.status_code == 202, first.text
    sample = first.json()
    assert first.headers["location"] == f"/v1/jobs/{jobs['shapes']}/samples/{sample['id']}"
    assert sample["state"] == "QUEUED" and sample["files"] == {} and sample["request"] == body
    sid, entrypoint, env = cluster.tasks[-1]
    assert sid == f"rcm-s-{sample['id']}" and entrypoint == "python -m workers.samples"
    assert env["RCM_JOB_ID"] == jobs["shapes"] and json.loads(env["RCM_SAMPLE_REQUEST"]) == body
    assert env["RCM_TEACHER_URI"] == "builtin:shapes" and json.loads(env["RCM_JOB_SPEC"]) == SHAPES
    second = _post(client, tokens["a"], jobs["wan"], {"prompt_embeds_uri": OWN + "embeds.safetensors"})
    assert second.status_code == 202, second.text
    assert cluster.tasks[-1][2]["RCM_TEACHER_FAMILY"] == "wan2.1"
    third = _post(client, tokens["a"], jobs["shapes"], body)
    assert third.status_code == 429 and third.headers["retry-after"]
    # the first one runs, then succeeds: its outputs (result.json last) are in S3
    url = f"/v1/jobs/{jobs['shapes']}/samples/{sample['id']}"
    cluster.ray_status[sid] = ClusterJobStatus("RUNNING")
    assert client.get(url, headers=_h(tokens["a"])).json()["state"] == "RUNNING"
    assert client.get(url + "/grid.png", headers=_h(tokens["a"])).status_code == 409  # not yet
    prefix = f"jobs/{jobs['shapes']}/samples/{sample['id']}/"
    cluster.objects[("ckpt", prefix + "grid.png")] = b"\x89PNG grid"
    cluster.objects[("ckpt", prefix + "samples.safetensors")] = b"samples"
    result = {"step": 4, "files": {"grid.png": 9, "samples.safetensors": 7}, "steps": 2, "num_samples": 3, "seed": 7}
    cluster.objects[("ckpt", prefix + "result.json")] = json.dumps(result).encode()
    cluster.ray_status[sid] = ClusterJobStatus("SUCCEEDED")
    done = client.get(url, headers=_h(tokens["a"])).json()
    assert done["state"] == "SUCCEEDED" and done["step"] == 4
    assert done["files"] == {"grid.png": url + "/grid.png", "samples.safetensors": url + "/samples.safetensors"}
    png = client.get(done["files"]["grid.png"], headers=_h(tokens["a"]))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content == b"\x89PNG grid"
    assert client.get(url, headers=_h(tokens["b"])).status_code == 404  # another tenant: no such job
    assert client.get(url + "/grid.png", headers=_h(tokens["b"])).status_code == 404
    # a slot is free again; the wan one fails with the worker's line
    assert _post(client, tokens["a"], jobs["shapes"], body).status_code == 202
    wan_url = f"/v1/jobs/{jobs['wan']}/samples/{second.json()['id']}"
    cluster.ray_status[f"rcm-s-{second.json()['id']}"] = ClusterJobStatus("FAILED", "rcm-worker: error: bad embeds")
    failed = client.get(wan_url, headers=_h(tokens["a"])).json()
    assert failed["state"] == "FAILED" and failed["failure_reason"] == "rcm-worker: error: bad embeds"
    # a succeeded run that left no result.json is not reported as succeeded
    last = cluster.tasks[-1][0]
    cluster.ray_status[last] = ClusterJobStatus("SUCCEEDED")
    gone = client.get(f"/v1/jobs/{jobs['shapes']}/samples/{last.removeprefix('rcm-s-')}", headers=_h(tokens["a"]))
    assert gone.json()["state"] == "FAILED" and "without writing its outputs" in gone.json()["failure_reason"]


def test_create_samples_while_ray_is_down_is_503_and_stores_nothing(app_and_tokens, jobs):
    client, tokens, cluster, app = app_and_tokens
    cluster.fail_submit = True
    try:
        r = _post(client, tokens["a"], jobs["shapes"], {"prompts": ["a photo of a red circle"]})
    finally:
        cluster.fail_submit = False
    assert r.status_code == 503 and r.headers["retry-after"]
    from service.db import Operation

    with app.state.sessionmaker() as s:
        assert all(op.state != "QUEUED" for op in s.query(Operation).filter(Operation.job_id == jobs["shapes"]))


# -- datasets -----------------------------------------------------------------------------------------------------
DATASET = {
    "name": "wan-prompts",
    "prompts": {"uri": OWN + "prompts.txt"},
    "pipeline": {"uri": OWN + "wan-pipe/"},
    "synthesize": True,
    "latent_shape": [4, 2, 4, 4],
    "steps": 2,
}


@pytest.mark.parametrize(
    ("change", "loc", "expected"),
    [
        ({"prompts": {"uri": "s3://ckpt/tenants/tenant-b/prompts.txt"}}, ["body", "prompts", "uri"], "input prefix"),
        ({"pipeline": {"uri": "s3://ckpt/jobs/x/export/"}}, ["body", "pipeline", "uri"], "input prefix"),
        ({"pipeline": {"uri": OWN + "wan-pipe"}}, ["body", "pipeline"], "ending in /"),
        ({"name": "../other"}, ["body", "name"], "should match pattern"),
        ({"latent_shape": None}, ["body"], "latent_shape [C, F, H, W] is required"),
        ({"synthesize": False}, ["body"], "only valid with synthesize"),
        ({"steps": 0}, ["body", "steps"], "greater than or equal to 1"),
    ],
)
def test_create_dataset_with_bad_input_is_422_naming_the_field(app_and_tokens, change, loc, expected):
    client, tokens, cluster, _ = app_and_tokens
    before = list(cluster.tasks)
    r = client.post("/v1/datasets", json={**DATASET, **change}, headers=_h(tokens["a"]))
    assert r.status_code == 422, r.text
    assert any(e["loc"] == loc and expected in e["msg"] for e in r.json()["detail"]), r.text
    assert cluster.tasks == before


def test_create_dataset_queues_prepare_and_refuses_to_overwrite(app_and_tokens):
    client, tokens, cluster, _ = app_and_tokens
    cluster.objects[("ckpt", "tenants/tenant-a/datasets/old/manifest.json")] = b"{}"
    r = client.post("/v1/datasets", json={**DATASET, "name": "old"}, headers=_h(tokens["a"]))
    assert r.status_code == 409 and "already holds files" in r.json()["detail"]
    r = client.post("/v1/datasets", json=DATASET, headers=_h(tokens["a"]))
    assert r.status_code == 202, r.text
    ds = r.json()
    assert ds["uri"] == OWN + "datasets/wan-prompts/" and ds["state"] == "QUEUED" and r.headers["location"]
    sid, entrypoint, env = cluster.tasks[-1]
    request = json.loads(env["RCM_DATASET_REQUEST"])
    assert entrypoint == "python -m workers.prepare" and sid == f"rcm-d-{ds['id']}"
    assert request["out_uri"] == ds["uri"] and request["pipeline_uri"] == OWN + "wan-pipe/"
    again = client.post("/v1/datasets", json=DATASET, headers=_h(tokens["a"]))
    assert again.status_code == 409 and "being prepared" in again.json()["detail"]
    assert client.get("/v1/datasets/wan-prompts", headers=_h(tokens["b"])).status_code == 404  # not b's
    cluster.objects[("ckpt", "tenants/tenant-a/datasets/wan-prompts/manifest.json")] = b'{"count": 3}'
    cluster.ray_status[sid] = ClusterJobStatus("SUCCEEDED")
    done = client.get("/v1/datasets/wan-prompts", headers=_h(tokens["a"])).json()
    assert done["state"] == "SUCCEEDED" and done["count"] == 3


def test_client_samples_and_recursive_upload_against_the_app(app_and_tokens, jobs, tmp_path):
    """RcmClient: `upload_folder(recursive=True)` (`rcm upload -r DIR`) keeps a pipeline's sub-folders, and
    `samples` / `sample` / `create_dataset` / `dataset` speak the routes above."""
    from rcm_client import RcmClient

    client, tokens, cluster, _ = app_and_tokens
    for rel in ("model_index.json", "tokenizer/spiece.model", "text_encoder/config.json", ".cache/x"):
        (tmp_path / "pipe" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pipe" / rel).write_text(rel)
    rcm = RcmClient("http://testserver", tokens["a"])
    rcm.http = client  # the in-process app (TestClient is an httpx.Client)
    client.headers["Authorization"] = f"Bearer {tokens['a']}"
    try:
        out = rcm.upload_folder(tmp_path / "pipe", "pipes/wan", recursive=True)
        flat = rcm.upload_folder(tmp_path / "pipe", "pipes/flat")
        queued = rcm.samples(jobs["wan"], prompt_embeds_uri=OWN + "embeds.safetensors", steps=1)
        assert rcm.sample(jobs["wan"], queued["id"])["state"] == "QUEUED"
        ds = rcm.create_dataset({**DATASET, "name": "from-client", "pipeline": {"uri": out["uri"]}})
        assert rcm.dataset("from-client")["uri"] == ds["uri"] == OWN + "datasets/from-client/"
    finally:
        del client.headers["Authorization"]
    assert out["uri"] == OWN + "pipes/wan/" and flat["uri"] == OWN + "pipes/flat/"
    stored = {k.removeprefix("tenants/tenant-a/pipes/") for _, k in cluster.objects if "/pipes/" in k}
    assert stored == {
        "wan/model_index.json",
        "wan/tokenizer/spiece.model",
        "wan/text_encoder/config.json",
        "flat/model_index.json",
    }


@pytest.mark.parametrize(
    ("method", "path", "codes"),
    [
        ("post", "/v1/jobs/{job_id}/samples", {"202", "400", "401", "404", "409", "413", "422", "429", "503"}),
        ("get", "/v1/jobs/{job_id}/samples/{sample_id}", {"200", "401", "404", "422", "429", "503"}),
        ("get", "/v1/jobs/{job_id}/samples/{sample_id}/{file}", {"200", "401", "404", "409", "422", "429", "503"}),
        ("post", "/v1/datasets", {"202", "400", "401", "409", "413", "422", "429", "503"}),
        ("get", "/v1/datasets/{name}", {"200", "401", "404", "422", "429", "503"}),
    ],
)
def test_openapi_documents_every_status_code_of_the_operations(app_and_tokens, method, path, codes):
    client = app_and_tokens[0]
    responses = client.get("/openapi.json").json()["paths"][path][method]["responses"]
    assert codes <= set(responses), sorted(codes - set(responses))
    for code in codes - {"200", "202", "422"}:
        assert responses[code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorPublic"}
    for code in codes & {"429", "503"}:
        assert "Retry-After" in responses[code]["headers"]
