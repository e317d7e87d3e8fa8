"""Issue 15, finding 9 (request part): a per-tenant token bucket in each API process; beyond it 429 with
Retry-After. Against the real app under uvicorn with a small bucket (one request every 2 s, bursts of 5)."""

import time

import pytest

from tests.service.live_api import LiveApi

RATE, BURST = 0.5, 5  # slow refill: a slow machine cannot earn a token back while the test sends


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    live = LiveApi(tmp_path_factory.mktemp("rate"), env={"RATE_LIMIT_PER_S": str(RATE), "RATE_LIMIT_BURST": str(BURST)})
    try:
        yield live.start()
    finally:
        live.stop()


def test_read_jobs_over_tenant_rate_is_429_with_retry_after(api):
    with api.client() as c:
        codes = [c.get("/v1/jobs", headers=api.headers()) for _ in range(BURST + 5)]
        assert [r.status_code for r in codes[:BURST]] == [200] * BURST
        limited = [r for r in codes[BURST:] if r.status_code == 429]
        assert len(limited) >= 4, [r.status_code for r in codes]  # at most one token refilled meanwhile
        retry = int(limited[-1].headers["retry-after"])
        assert 1 <= retry <= 1 + 1 / RATE
        assert "rate limit" in limited[-1].json()["detail"]
        # Other tenants and the health endpoints are not affected by tenant a's bucket.
        assert c.get("/v1/jobs", headers=api.headers("b")).status_code == 200
        assert c.get("/healthz").status_code == 200
        time.sleep(retry)
        assert c.get("/v1/jobs", headers=api.headers()).status_code == 200  # the bucket refills


def test_rate_limit_does_not_apply_before_authentication(api):
    with api.client() as c:
        codes = {c.get("/v1/jobs", headers={"Authorization": "Bearer rcm_wrong"}).status_code for _ in range(10)}
    assert codes == {401}
