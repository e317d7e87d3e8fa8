"""Liveness, readiness and process metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import text

from service.api.deps import ClusterDep, SessionDep
from service.schemas import ReadyPublic

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (answered on the event loop itself: no thread, no database)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyPublic,
    responses={503: {"model": ReadyPublic, "description": "The database or a backend does not answer"}},
)
def readyz(session: SessionDep, cluster: ClusterDep) -> JSONResponse:
    """The database and every backend (Ray, MLflow, S3) answer."""
    checks = {"database": True}
    try:
        session.execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001
        checks["database"] = False
    checks |= cluster.healthy()
    ok = all(checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> str:
    """Gauges of this API process in Prometheus text format: job-store connections in use, open event streams."""
    state = request.app.state
    gauges = {
        "rcm_db_pool_checked_out": (state.engine.pool.checkedout(), "job-store connections checked out"),
        "rcm_event_streams_open": (state.event_streams.total(), "open server-sent event streams"),
    }
    return "".join(f"# HELP {k} {h}\n# TYPE {k} gauge\n{k} {v}\n" for k, (v, h) in gauges.items())
