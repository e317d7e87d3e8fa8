"""The FastAPI app: routers, lifespan (migrations, cluster backend, reconciler), limits, error handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Scope

from service.api.errors import install_error_handlers
from service.api.limits import install_limits
from service.api.middleware import BodySizeLimit
from service.api.routes import datasets, events, health, inputs, jobs, samples
from service.cluster import RayCluster
from service.db import make_engine, make_sessionmaker, run_migrations
from service.reconciler import Limits, Reconciler
from service.settings import get_settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    run_migrations(settings.DATABASE_URL)
    app.state.engine = make_engine(
        settings.DATABASE_URL,
        pool_size=settings.DB_POOL_SIZE,
        max_overflow=settings.DB_MAX_OVERFLOW,
        pool_timeout_s=settings.DB_POOL_TIMEOUT_S,
    )
    app.state.sessionmaker = make_sessionmaker(app.state.engine)
    install_limits(app.state, settings)
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


def _body_limit(scope: Scope) -> int | None:
    """The most bytes a request body may have; None: the route streams and counts the body itself."""
    if scope.get("method") == "PUT" and scope.get("path", "").startswith("/v1/inputs/"):
        return None  # uploads go to a spooled file, counted against MAX_INPUT_BYTES (api/routes/inputs.py)
    return get_settings().MAX_BODY_BYTES


app = FastAPI(title="rcm-distill control plane", version="0.1.0", lifespan=lifespan)
app.include_router(health.router)
app.include_router(jobs.router)
app.include_router(events.router)
app.include_router(inputs.router)
app.include_router(samples.router)
app.include_router(datasets.router)
install_error_handlers(app)
app.add_middleware(BodySizeLimit, max_bytes=_body_limit)
