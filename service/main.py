"""The FastAPI app: routers, lifespan (migrations, cluster backend, reconciler), body-size limit."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.api.routes import health, inputs, jobs
from service.cluster import RayCluster
from service.db import make_engine, make_sessionmaker, run_migrations
from service.reconciler import Limits, Reconciler
from service.settings import get_settings


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    run_migrations(settings.DATABASE_URL)
    app.state.sessionmaker = make_sessionmaker(make_engine(settings.DATABASE_URL))
    if not hasattr(app.state, "cluster"):  # tests may install their own backend first
        if settings.CLUSTER_BACKEND == "kuberay":
            from service.kuberay import KubeRayCluster  # imports the kubernetes client only when it is used

            app.state.cluster = KubeRayCluster(settings)
        else:
            app.state.cluster = RayCluster(settings)
    limits = Limits(
        max_active_jobs=settings.MAX_ACTIVE_JOBS,
        max_active_per_tenant=settings.MAX_ACTIVE_JOBS_PER_TENANT,
        start_timeout_s=settings.START_TIMEOUT_S,
        max_resubmits=settings.MAX_RESUBMITS,
    )
    reconciler = Reconciler(app.state.sessionmaker, app.state.cluster, settings.RECONCILE_INTERVAL_S, limits)
    reconciler.start()
    yield
    reconciler.stop()


app = FastAPI(title="rcm-distill control plane", version="0.1.0", lifespan=lifespan)
app.include_router(health.router)
app.include_router(jobs.router)
app.include_router(inputs.router)


@app.middleware("http")
async def limit_body_size(request: Request, call_next):
    length = request.headers.get("content-length")
    limit = get_settings().MAX_BODY_BYTES
    if request.method == "PUT" and request.url.path.startswith("/v1/inputs/"):
        limit = get_settings().MAX_INPUT_BYTES  # file uploads; the route also counts streamed bodies
    if length is not None and length.isdigit() and int(length) > limit:
        return JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)
    return await call_next(request)
