"""The job store on a real PostgreSQL server (started here on loopback, stopped by PID): Alembic migrations,
the REST API with the fake cluster and the API's own reconciler, and a restart of the API and of the database
that keeps every job and its history."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.cluster import ClusterJobStatus
from tests.service.fakes import FakeCluster
from tests.service.postgres import PostgresServer

SPEC = {"name": "pg", "teacher": {"uri": "builtin:toy2d"}, "schedule": {"steps": 100}}  # valid for any tenant


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    try:
        try:
            server.version()
        except (OSError, subprocess.CalledProcessError) as exc:
            reason = f"the bundled PostgreSQL server cannot run on this machine: {exc}"
            if os.environ.get("CI", "").lower() == "true":  # CI must run the real server, never skip it
                pytest.fail(reason)
            pytest.skip(reason)
        server.initdb()
        server.start()
        server.create_database("rcm")
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def app_on_postgres(postgres):
    """The real app with DATABASE_URL on the server; yields a function that (re)starts it as a TestClient."""
    from service.settings import get_settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATABASE_URL", postgres.url("rcm"))
        # RATE_LIMIT_PER_S: _wait_state polls at ~20 requests/s, the default sustained rate; these tests are not
        # about the rate limit (tests/service/test_rate_limits.py is).
        settings = {
            "S3_ACCESS_KEY": "k",
            "S3_SECRET_KEY": "s",
            "RECONCILE_INTERVAL_S": "0.1",
            "RATE_LIMIT_PER_S": "1000",
        }
        for k, v in settings.items():
            mp.setenv(k, v)
        get_settings.cache_clear()
        from service.main import app

        cluster = FakeCluster()
        app.state.cluster = cluster
        try:
            yield app, cluster
        finally:
            del app.state.cluster
            get_settings.cache_clear()


def _h(token):
    return {"Authorization": f"Bearer {token}"}


def _migrations_head() -> str:
    from alembic.script import ScriptDirectory

    import service.db

    return ScriptDirectory(str(Path(service.db.__file__).parent / "migrations")).get_current_head()


def test_migrations_apply_on_postgres(postgres):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from service.db import Base, make_engine, run_migrations

    postgres.create_database("migrations")
    url = postgres.url("migrations")
    run_migrations(url)
    run_migrations(url)  # idempotent: a restart runs them again
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.dialect.name == "postgresql"
            assert conn.scalar(sa.text("select version_num from alembic_version")) == _migrations_head()
            assert {"api_tokens", "jobs", "job_events"} <= set(sa.inspect(conn).get_table_names())
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], f"the migrated schema differs from service.db's models: {diff}"
    finally:
        engine.dispose()


def _wait_state(client, token, job_id, state, timeout=20.0):
    """Poll until the API's own reconciler (every 0.1 s here) has moved the job to `state`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/jobs/{job_id}", headers=_h(token)).json()
        if body["state"] == state:
            return body
        time.sleep(0.05)
    pytest.fail(f"job {job_id} is {body['state']}, not {state}, after {timeout:.0f}s")


def test_create_read_cancel_jobs_on_postgres(app_on_postgres):
    from service import crud

    app, cluster = app_on_postgres
    with TestClient(app) as client:
        with app.state.sessionmaker() as s:
            assert s.get_bind().dialect.name == "postgresql"
            token = crud.create_token(s, "tenant-pg")
        r = client.post("/v1/jobs", json=SPEC, headers={**_h(token), "Idempotency-Key": "pg-1"})
        assert r.status_code == 202
        job = r.json()
        again = client.post("/v1/jobs", json=SPEC, headers={**_h(token), "Idempotency-Key": "pg-1"})
        assert again.status_code == 200 and again.json()["id"] == job["id"]
        for i in range(3):
            client.post("/v1/jobs", json={**SPEC, "name": f"pg-{i}"}, headers=_h(token))
        seen, cursor = [], None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/jobs", params=params, headers=_h(token))
            assert page.status_code == 200
            seen += [j["id"] for j in page.json()["data"]]
            cursor = page.json()["next_cursor"]
            if not cursor:
                break
        assert len(seen) == len(set(seen)) == 4 and seen[-1] == job["id"]  # newest first

        _wait_state(client, token, job["id"], "STARTING")
        cluster.progress[f"run-{job['id']}"] = {"step": 30.0, "loss": 0.25}
        cluster.ray_status[f"rcm-{job['id']}"] = ClusterJobStatus("RUNNING")
        body = _wait_state(client, token, job["id"], "RUNNING")
        assert body["step"] == 30 and body["metrics"]["loss"] == 0.25
        r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=_h(token))
        assert r.status_code == 202 and r.json()["state"] == "CANCELLING" and job["id"] in cluster.cancelled
        cluster.ray_status[f"rcm-{job['id']}"] = ClusterJobStatus("SUCCEEDED")  # the worker saved and exited
        _wait_state(client, token, job["id"], "CANCELLED")
        events = client.get(f"/v1/jobs/{job['id']}/events", headers=_h(token)).json()
        states = [e["data"]["state"] for e in events if e["kind"] == "state"]
        assert states == ["QUEUED", "STARTING", "RUNNING", "CANCELLING", "CANCELLED"]


def test_restart_keeps_jobs_on_postgres(app_on_postgres, postgres):
    from service import crud

    app, cluster = app_on_postgres
    with TestClient(app) as client:
        with app.state.sessionmaker() as s:
            token = crud.create_token(s, "tenant-restart")
        job = client.post("/v1/jobs", json=SPEC, headers=_h(token)).json()
        _wait_state(client, token, job["id"], "STARTING")
        cluster.progress[f"run-{job['id']}"] = {"step": 40.0, "loss": 0.5, "recovery_count": 1.0}
        cluster.ray_status[f"rcm-{job['id']}"] = ClusterJobStatus("RUNNING")
        _wait_state(client, token, job["id"], "RUNNING")
        before = client.get(f"/v1/jobs/{job['id']}/events", headers=_h(token)).json()
    # the API is down (lifespan ended); restart the database under it too, then start a new API
    app.state.sessionmaker.kw["bind"].dispose()
    postgres.stop()
    postgres.start()
    with TestClient(app) as client:  # a new lifespan: migrations again, a new engine, a new reconciler
        body = client.get(f"/v1/jobs/{job['id']}", headers=_h(token)).json()
        assert body["state"] == "RUNNING" and body["step"] == 40 and body["recovery_count"] == 1
        assert body["spec"]["schedule"]["steps"] == 100 and body["mlflow_run_url"].endswith(f"run-{job['id']}")
        after = client.get(f"/v1/jobs/{job['id']}/events", headers=_h(token)).json()
        assert after[: len(before)] == before
        cluster.progress[f"run-{job['id']}"]["step"] = 100.0
        cluster.ray_status[f"rcm-{job['id']}"] = ClusterJobStatus("SUCCEEDED")
        assert _wait_state(client, token, job["id"], "SUCCEEDED")["step"] == 100
        assert job["id"] in [j["id"] for j in client.get("/v1/jobs", headers=_h(token)).json()["data"]]


def test_non_finite_metrics_are_stored_as_null_on_postgres(app_on_postgres):
    """Issue 15, finding 11: PostgreSQL's json type refuses NaN; a NaN/inf metric is stored and served as null."""
    from service import crud

    app, cluster = app_on_postgres
    with TestClient(app) as client:
        with app.state.sessionmaker() as s:
            token = crud.create_token(s, "tenant-nan")
        job = client.post("/v1/jobs", json=SPEC, headers=_h(token)).json()
        _wait_state(client, token, job["id"], "STARTING")
        cluster.progress[f"run-{job['id']}"] = {"step": 20.0, "loss": float("nan"), "scm_loss": float("-inf")}
        cluster.ray_status[f"rcm-{job['id']}"] = ClusterJobStatus("RUNNING")
        body = _wait_state(client, token, job["id"], "RUNNING")
        assert body["step"] == 20 and body["metrics"] == {"step": 20.0, "loss": None, "scm_loss": None}
        events = client.get(f"/v1/jobs/{job['id']}/events", headers=_h(token)).json()
        assert {"step": 20, "loss": None, "scm_loss": None} in [e["data"] for e in events if e["kind"] == "progress"]
