"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import ClusterDep, SessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
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
