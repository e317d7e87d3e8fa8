"""Issue 15, finding 5: concurrent requests with one Idempotency-Key make exactly one job, and a key reused
with a different body is refused. Real concurrency: threads released together against the app under uvicorn."""

import pytest

from tests.service.live_api import LiveApi, run_in_threads, teacher_uri

SPEC = {"name": "idem", "teacher": {"uri": teacher_uri("a")}, "schedule": {"steps": 100}}
CALLERS = 16


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    live = LiveApi(tmp_path_factory.mktemp("idem"), env={"RATE_LIMIT_PER_S": "1000"})
    try:
        yield live.start()
    finally:
        live.stop()


def _jobs_named(api, tenant, name):
    with api.client() as c:
        data = c.get("/v1/jobs", params={"limit": 200}, headers=api.headers(tenant)).json()["data"]
    return [j for j in data if j["name"] == name]


@pytest.mark.parametrize("attempt", range(5))  # a race: a few rounds, each with its own key
def test_create_job_concurrent_same_idempotency_key_makes_one_job(api, attempt):
    name = f"idem-race-{attempt}"

    def post(i):
        with api.client(timeout=30) as c:
            return c.post(
                "/v1/jobs", json={**SPEC, "name": name}, headers=api.headers(**{"Idempotency-Key": f"race-{attempt}"})
            )

    responses = run_in_threads(post, CALLERS)
    errors = [r for r in responses if isinstance(r, Exception)]
    assert not errors, errors
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * (CALLERS - 1) + [202], [(r.status_code, r.text[:200]) for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(_jobs_named(api, "a", name)) == 1


def test_create_job_same_idempotency_key_different_body_is_422(api):
    h = api.headers(**{"Idempotency-Key": "reused"})
    with api.client() as c:
        first = c.post("/v1/jobs", json={**SPEC, "name": "idem-first"}, headers=h)
        again = c.post("/v1/jobs", json={**SPEC, "name": "idem-first"}, headers=h)
        # Key order does not make it another request: the canonical spec is hashed. (A spelled-out value that
        # the user left unset before is another request: unset fields take the task preset's value.)
        same = c.post(
            "/v1/jobs",
            json={"schedule": {"steps": 100}, "teacher": SPEC["teacher"], "name": "idem-first"},
            headers=h,
        )
        other = c.post("/v1/jobs", json={**SPEC, "name": "idem-second"}, headers=h)
        other_tenant = c.post(
            "/v1/jobs",
            json={**SPEC, "name": "idem-second", "teacher": {"uri": teacher_uri("b")}},
            headers=api.headers("b", **{"Idempotency-Key": "reused"}),
        )
    assert (first.status_code, again.status_code, same.status_code) == (202, 200, 200)
    assert first.json()["id"] == again.json()["id"] == same.json()["id"]
    assert other.status_code == 422, other.text
    assert other.json()["detail"][0]["loc"] == ["header", "idempotency-key"]
    assert "different job spec" in other.json()["detail"][0]["msg"]
    assert _jobs_named(api, "a", "idem-second") == []  # nothing created for the refused request
    assert other_tenant.status_code == 202  # keys are per tenant
