"""Issue 15, finding 1: server-sent event streams must not hang the API.

The real app under uvicorn (tests/service/live_api.py: own port, own SQLite file, the real RayCluster with
Ray/MLflow/S3 unreachable, so jobs stay QUEUED and their streams stay open). One tenant opens many more
streams than its cap while normal traffic goes on; health and job reads must stay fast, the streams over
the cap get 429, and once the clients leave no stream slot or database connection is left behind.
"""

import threading
import time

import httpx
import pytest

from tests.service.live_api import LiveApi, run_in_threads, teacher_uri

CAP = 4
STREAMS = 24  # well over the cap and over the old pool (5 + 10 connections) that used to run dry
SPEC = {"name": "sse", "teacher": {"uri": teacher_uri("a")}, "schedule": {"steps": 100}}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    live = LiveApi(
        tmp_path_factory.mktemp("sse"),
        env={
            "EVENT_STREAMS_PER_TENANT": str(CAP),
            "EVENT_STREAM_POLL_S": "0.2",
            "EVENT_STREAM_IDLE_S": "600",
            "EVENT_STREAM_MAX_S": "600",
            "RATE_LIMIT_PER_S": "1000",
            "RECONCILE_INTERVAL_S": "0.5",
        },
    )
    try:
        yield live.start()
    finally:
        live.stop()


def _job(api, tenant="a"):
    with api.client() as c:
        r = c.post("/v1/jobs", json={**SPEC, "teacher": {"uri": teacher_uri(tenant)}}, headers=api.headers(tenant))
        assert r.status_code == 202, r.text
        return r.json()["id"]


def _wait_for(predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_read_events_stream_over_cap_keeps_api_responsive_and_leaks_nothing(api):
    job_id = _job(api)
    stop = threading.Event()
    opened = threading.Barrier(STREAMS + 1, timeout=60)

    def hold_stream(i):
        """Open one stream, note its status and first bytes, keep the connection until told to stop, leave."""
        with httpx.Client(base_url=api.url, timeout=30) as c:
            try:
                with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=api.headers(Accept="text/event-stream")) as r:
                    status, retry_after = r.status_code, r.headers.get("retry-after")
                    chunks = r.iter_text()  # kept: a dropped, half-read iterator closes the response
                    first = next(chunks) if status == 200 else r.read().decode()
                    opened.wait()
                    stop.wait(60)
                    return status, retry_after, first
            except Exception:
                opened.abort()
                raise

    holders = []
    results = [None] * STREAMS

    def run_holder(i):
        results[i] = hold_stream(i)

    for i in range(STREAMS):
        t = threading.Thread(target=run_holder, args=(i,), daemon=True)
        t.start()
        holders.append(t)
    try:
        opened.wait()  # every stream request has had its answer and the accepted ones are open
        # Normal traffic from the same tenant and another one while the streams are open: each answer < 1 s.
        worst = {}
        with api.client(timeout=5) as c:
            for _ in range(15):
                for name, call in {
                    "healthz": lambda: c.get("/healthz"),
                    "read_job": lambda: c.get(f"/v1/jobs/{job_id}", headers=api.headers()),
                    "read_jobs_b": lambda: c.get("/v1/jobs", headers=api.headers("b")),
                    "create_job_b": lambda: c.post(
                        "/v1/jobs", json={**SPEC, "teacher": {"uri": teacher_uri("b")}}, headers=api.headers("b")
                    ),
                }.items():
                    t0 = time.monotonic()
                    r = call()
                    worst[name] = max(worst.get(name, 0.0), time.monotonic() - t0)
                    assert r.status_code in (200, 202), (name, r.status_code, r.text)
                time.sleep(0.1)
            assert all(v < 1.0 for v in worst.values()), worst
            assert api.metric("rcm_event_streams_open") == CAP
            # The cap is per tenant: tenant b still gets its own stream.
            with c.stream(
                "GET", f"/v1/jobs/{_job(api, 'b')}/events", headers=api.headers("b", Accept="text/event-stream")
            ) as r:
                assert r.status_code == 200
    finally:
        stop.set()
        for t in holders:
            t.join(timeout=30)
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * CAP + [429] * (STREAMS - CAP), statuses
    assert all(r[1] is not None and int(r[1]) >= 1 for r in results if r[0] == 429)
    assert all(r[2].startswith("retry:") for r in results if r[0] == 200)
    # Once every client has gone: no open stream, no job-store connection checked out.
    assert _wait_for(lambda: api.metric("rcm_event_streams_open") == 0, 10), api.metric("rcm_event_streams_open")
    assert _wait_for(lambda: api.metric("rcm_db_pool_checked_out") == 0, 10), api.metric("rcm_db_pool_checked_out")
    with api.client() as c:  # and the tenant can stream again
        with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=api.headers(Accept="text/event-stream")) as r:
            assert r.status_code == 200 and "event: state" in "".join(_first_chunks(r, 2))


def _first_chunks(r, n):
    out = []
    for chunk in r.iter_text():
        out.append(chunk)
        if len(out) >= n:
            break
    return out


def test_read_events_stream_many_clients_at_once_never_block_health(api):
    """Requests racing the stream opens: /healthz answers in < 1 s while 40 stream requests arrive together."""
    job_id = _job(api)
    timings = []
    done = threading.Event()

    def probe():
        with api.client(timeout=5) as c:
            while not done.is_set():
                t0 = time.monotonic()
                assert c.get("/healthz").status_code == 200
                timings.append(time.monotonic() - t0)
                time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()

    def open_and_leave(i):
        with httpx.Client(base_url=api.url, timeout=10) as c:
            with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=api.headers(Accept="text/event-stream")) as r:
                return r.status_code

    try:
        statuses = run_in_threads(open_and_leave, 40)
    finally:
        time.sleep(0.5)
        done.set()
        prober.join(timeout=10)
    assert all(s in (200, 429) for s in statuses), statuses
    assert timings and max(timings) < 1.0, max(timings)
    assert _wait_for(lambda: api.metric("rcm_event_streams_open") == 0, 10)
    assert _wait_for(lambda: api.metric("rcm_db_pool_checked_out") == 0, 10)


@pytest.fixture(scope="module")
def short_api(tmp_path_factory):
    live = LiveApi(
        tmp_path_factory.mktemp("sse-short"),
        env={"EVENT_STREAM_POLL_S": "0.2", "EVENT_STREAM_IDLE_S": "1.5", "EVENT_STREAM_MAX_S": "600"},
        tenants=("a",),
    )
    try:
        yield live.start()
    finally:
        live.stop()


def test_read_events_stream_idle_ends_and_resumes_after_last_event_id(short_api):
    api = short_api
    job_id = _job(api)
    t0 = time.monotonic()
    with api.client() as c:
        with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=api.headers(Accept="text/event-stream")) as r:
            text = "".join(r.iter_text())  # returns only when the server ends the stream
    elapsed = time.monotonic() - t0
    assert 1.4 < elapsed < 6, elapsed  # ended by the idle limit, although the job is still QUEUED
    ids = [int(line.split()[1]) for line in text.splitlines() if line.startswith("id: ")]
    assert ids and "event: state" in text
    with api.client() as c:  # reconnect after the last id seen: nothing is sent twice
        headers = api.headers(Accept="text/event-stream", **{"Last-Event-ID": str(ids[-1])})
        with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
            again = "".join(r.iter_text())
    assert r.status_code == 200 and "id: " not in again
    assert api.metric("rcm_event_streams_open") == 0 and api.metric("rcm_db_pool_checked_out") == 0


def test_read_events_stream_lifetime_limit(tmp_path):
    live = LiveApi(
        tmp_path,
        env={"EVENT_STREAM_POLL_S": "0.2", "EVENT_STREAM_IDLE_S": "600", "EVENT_STREAM_MAX_S": "2"},
        tenants=("a",),
    ).start()
    try:
        job_id = _job(live)
        t0 = time.monotonic()
        with live.client() as c:
            with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=live.headers(Accept="text/event-stream")) as r:
                "".join(r.iter_text())
        assert 1.9 < time.monotonic() - t0 < 6
    finally:
        live.stop()


def test_follow_job_events_reconnects_across_idle_ends_until_the_job_ends(short_api):
    """rcm_client's follow(): the server ends idle streams, the client resumes from the last id it saw."""
    from rcm_client.client import RcmClient

    api = short_api
    job_id = _job(api)
    seen = []
    follower = threading.Thread(
        target=lambda: seen.extend(RcmClient(api.url, api.tokens["a"]).follow(job_id)), daemon=True
    )
    follower.start()
    time.sleep(4)  # at least one idle end (1.5 s) while the job waits
    with api.client() as c:
        assert c.post(f"/v1/jobs/{job_id}/cancel", headers=api.headers()).status_code == 202
    follower.join(timeout=20)
    assert not follower.is_alive()
    ids = [e["id"] for e in seen]
    assert ids == sorted(set(ids)), ids  # nothing twice, nothing out of order
    states = [e["data"]["state"] for e in seen if e["kind"] == "state"]
    assert states == ["QUEUED", "CANCELLING", "CANCELLED"], states
    assert api.log_text().count(f"GET /v1/jobs/{job_id}/events") >= 2  # it did reconnect
