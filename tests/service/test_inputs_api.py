"""Tenant-scoped inputs (issue 15, finding 3): job URIs outside the caller's prefix are 422 before any read;
/v1/inputs writes, lists and deletes only under the caller's prefix. The real app and SQLite store, the cluster
backend swapped for a fake (it records what would be read or written in S3)."""

import pytest

from tests.service import test_jobs_api
from tests.service.test_jobs_api import SHAPES, SPEC, _h

app_and_tokens = test_jobs_api.app_and_tokens  # the API unit tests' app (real app + SQLite, fake cluster)

OWN = "s3://ckpt/tenants/tenant-a/"


@pytest.mark.parametrize(
    ("field", "uri"),
    [
        ("teacher", "s3://ckpt/tenants/tenant-b/t.safetensors"),  # another tenant's input
        ("teacher", "s3://ckpt/jobs/0f6a4f4e-5a0e-4c43-9b8e-000000000000/export/student.safetensors"),  # an export
        ("teacher", "s3://ckpt/ray/0f6a4f4e/checkpoint_1/__0_0.distcp"),  # a checkpoint
        ("teacher", "s3://mlflow/artifacts/1/abc/artifacts/student.safetensors"),  # MLflow artifacts
        ("teacher", "s3://other-bucket/tenants/tenant-a/t.safetensors"),  # another bucket, same key
        ("teacher", "s3://ckpt/tenants/tenant-a/../tenant-b/t.safetensors"),  # a way out of the prefix
        ("teacher", "s3://ckpt/tenants/tenant-a//t.safetensors"),
        ("teacher", "s3://ckpt/tenants/tenant-ab/t.safetensors"),  # a tenant whose name starts with ours
        ("teacher", "s3://ckpt/tenants/tenant-a"),
        ("prompts", "s3://ckpt/tenants/tenant-b/p.txt"),
        ("prompts", "s3://ckpt/tenants/tenant-a/./p.txt"),
    ],
)
def test_create_job_input_outside_the_tenant_prefix_422_names_the_field(app_and_tokens, field, uri):
    client, tokens, cluster, _ = app_and_tokens
    before = list(client.get("/v1/jobs", headers=_h(tokens["a"])).json()["data"])
    if field == "teacher":
        spec, loc = {**SPEC, "teacher": {"uri": uri}}, ["body", "teacher", "uri"]
    else:
        spec, loc = {**SPEC, "data": {**SHAPES, "prompt_file_uri": uri}}, ["body", "data", "prompt_file_uri"]
    r = client.post("/v1/jobs", json=spec, headers=_h(tokens["a"]))
    assert r.status_code == 422, r.text
    errors = [e for e in r.json()["detail"] if e["loc"] == loc]
    assert errors and OWN in errors[0]["msg"] and "PUT /v1/inputs/" in errors[0]["msg"], r.json()
    assert client.get("/v1/jobs", headers=_h(tokens["a"])).json()["data"] == before  # nothing stored


def test_upload_input_then_submit_a_job_naming_it(app_and_tokens):
    client, tokens, cluster, _ = app_and_tokens
    r = client.put("/v1/inputs/teacher.safetensors", content=b"weights", headers=_h(tokens["a"]))
    assert r.status_code == 201, r.text
    assert r.json() == {"name": "teacher.safetensors", "uri": OWN + "teacher.safetensors", "size": 7}
    assert cluster.objects[("ckpt", "tenants/tenant-a/teacher.safetensors")] == b"weights"
    job = client.post("/v1/jobs", json={**SPEC, "teacher": {"uri": r.json()["uri"]}}, headers=_h(tokens["a"]))
    assert job.status_code == 202, job.text
    names = [i["name"] for i in client.get("/v1/inputs", headers=_h(tokens["a"])).json()]
    assert "teacher.safetensors" in names
    # the other tenant neither sees it nor may name it
    assert all(i["name"] != "teacher.safetensors" for i in client.get("/v1/inputs", headers=_h(tokens["b"])).json())
    other = client.post("/v1/jobs", json={**SPEC, "teacher": {"uri": r.json()["uri"]}}, headers=_h(tokens["b"]))
    assert other.status_code == 422
    assert client.delete("/v1/inputs/teacher.safetensors", headers=_h(tokens["a"])).status_code == 204
    assert ("ckpt", "tenants/tenant-a/teacher.safetensors") not in cluster.objects


# Names are paths of up to 8 segments (a teacher folder's files); a segment that is empty, '.', '..' or hidden,
# too long, or with characters outside letters, digits and . _ - is refused, as is a 9th segment.
@pytest.mark.parametrize(
    "name",
    ["..", ".hidden", "x" * 200, "sp ace", "a/%2E%2E/b", "a//b", "a/.hidden/b", "a/b/", "/a", "/".join("a" * 9)],
)
def test_upload_input_bad_name_is_rejected(app_and_tokens, name):
    client, tokens, cluster, _ = app_and_tokens
    before = dict(cluster.objects)
    r = client.put(f"/v1/inputs/{name}", content=b"x", headers=_h(tokens["a"]))
    assert r.status_code in (404, 422), r.text  # a path the router does not match (404) or the name pattern
    assert cluster.objects == before


@pytest.mark.parametrize("method", ["put", "delete"])
def test_input_name_with_a_newline_is_422_not_an_undocumented_404(app_and_tokens, method):
    """The fuzz found DELETE /v1/inputs/a%0Ab answered 404 (the router's path match stopped at the newline)."""
    client, tokens, cluster, _ = app_and_tokens
    before = dict(cluster.objects)
    kw = {"content": b"x"} if method == "put" else {}
    r = getattr(client, method)("/v1/inputs/a%0Ab", headers=_h(tokens["a"]), **kw)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["path", "name"]
    assert cluster.objects == before


def test_upload_input_into_a_folder_gives_the_folder_uri(app_and_tokens):
    """A diffusers teacher is a folder: its files go up as FOLDER/FILE, and the job names s3://.../FOLDER/."""
    client, tokens, cluster, _ = app_and_tokens
    r = client.put("/v1/inputs/wan/transformer/config.json", content=b"{}", headers=_h(tokens["a"]))
    assert r.status_code == 201, r.text
    assert r.json() == {"name": "wan/transformer/config.json", "uri": OWN + "wan/transformer/config.json", "size": 2}
    assert cluster.objects[("ckpt", "tenants/tenant-a/wan/transformer/config.json")] == b"{}"
    listed = client.get("/v1/inputs", headers=_h(tokens["a"])).json()
    assert "wan/transformer/config.json" in {i["name"] for i in listed}
    r = client.delete("/v1/inputs/wan/transformer/config.json", headers=_h(tokens["a"]))
    assert r.status_code == 204 and ("ckpt", "tenants/tenant-a/wan/transformer/config.json") not in cluster.objects


def test_upload_input_over_the_limit_413_also_when_chunked(app_and_tokens):
    client, tokens, cluster, _ = app_and_tokens
    before = dict(cluster.objects)
    big = b"x" * 70_000  # MAX_INPUT_BYTES is 65536 in this module's app
    assert client.put("/v1/inputs/big.bin", content=big, headers=_h(tokens["a"])).status_code == 413

    def chunks():  # no Content-Length: Transfer-Encoding chunked
        for _ in range(7):
            yield b"x" * 10_000

    assert client.put("/v1/inputs/big.bin", content=chunks(), headers=_h(tokens["a"])).status_code == 413
    assert cluster.objects == before


def test_upload_input_requires_a_token(app_and_tokens):
    client, *_ = app_and_tokens
    assert client.put("/v1/inputs/a.txt", content=b"x").status_code == 401
    assert client.get("/v1/inputs").status_code == 401


@pytest.mark.parametrize("tenant", ["a/b", "..", "", "x" * 65, "-lead"])
def test_create_token_refuses_tenant_names_that_are_not_one_path_segment(tenant, app_and_tokens):
    from service import crud

    _, _, _, app = app_and_tokens
    with app.state.sessionmaker() as s, pytest.raises(ValueError, match="tenant name"):
        crud.create_token(s, tenant)
