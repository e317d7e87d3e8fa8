"""The job spec's `export` section (issue 18, item 4) at submission, against the real app under uvicorn: the
registered model name must be in the caller's namespace `<tenant>.<model>` and well formed, the shard size a
size; a bad one is a 422 naming the field and nothing is queued. The app runs with Ray, MLflow and S3
unreachable (tests/service/live_api.py): these checks need none of them."""

import json

import pytest

from tests.service.live_api import LiveApi, teacher_uri

SPEC = {"name": "export", "teacher": {"uri": teacher_uri("a")}, "schedule": {"steps": 100}}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    live = LiveApi(tmp_path_factory.mktemp("export"), env={"RATE_LIMIT_PER_S": "1000"})
    try:
        yield live.start()
    finally:
        live.stop()


def _post(api, spec: dict, tenant: str = "a"):
    with api.client() as c:
        return c.post(
            "/v1/jobs", content=json.dumps(spec), headers=api.headers(tenant, **{"Content-Type": "application/json"})
        )


def _jobs(api, tenant: str = "a"):
    with api.client() as c:
        return c.get("/v1/jobs", params={"limit": 200}, headers=api.headers(tenant)).json()["data"]


@pytest.mark.parametrize(
    ("export", "field", "says"),
    [
        ({"registered_model_name": "tenant-b.wan-4step"}, "registered_model_name", "tenant-a.<model>"),  # b's
        ({"registered_model_name": "tenant-a.x.y"}, "registered_model_name", "tenant-a.<model>"),  # tenant "tenant-a.x"
        ({"registered_model_name": "wan-4step"}, "registered_model_name", "pattern"),  # no namespace at all
        ({"registered_model_name": "tenant-a/wan"}, "registered_model_name", "pattern"),  # '/' is no MLflow name
        ({"registered_model_name": "tenant-a.wan:1"}, "registered_model_name", "pattern"),
        ({"max_shard_size": "5 GB"}, "max_shard_size", "pattern"),
        ({"max_shard_size": "0GB"}, "max_shard_size", "pattern"),
        ({"registered_model": "tenant-a.wan"}, "registered_model", "extra"),
    ],
)
def test_create_job_with_a_bad_export_section_is_422_naming_the_field(api, export, field, says):
    before = _jobs(api)
    r = _post(api, {**SPEC, "export": export})
    assert r.status_code == 422, r.text
    errors = [e for e in r.json()["detail"] if e["loc"] == ["body", "export", field]]
    assert errors, r.json()
    assert says in errors[0]["msg"] or says in errors[0]["type"], errors
    assert _jobs(api) == before


def test_create_job_with_a_model_in_its_own_namespace_is_accepted(api):
    export = {"registered_model_name": "tenant-b.wan2-1_4step", "max_shard_size": "200MB"}
    r = _post(api, {**SPEC, "teacher": {"uri": teacher_uri("b")}, "export": export}, tenant="b")
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["export"] == export
