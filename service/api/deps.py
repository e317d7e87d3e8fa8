"""Request dependencies: database session, tenant from the bearer token, cluster backend."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service import crud
from service.api.limits import retry_after
from service.cluster import Cluster

_bearer = HTTPBearer(auto_error=False)


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_tenant(
    request: Request, session: SessionDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The caller's tenant (401 without a valid token), after one token of its rate-limit bucket (429 if empty)."""
    tenant = crud.tenant_for_token(session, creds.credentials) if creds else None
    if tenant is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"}
        )
    wait_s = request.app.state.rate_limits.take(tenant)
    if wait_s:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "rate limit exceeded for this tenant",
            {"Retry-After": retry_after(wait_s)},
        )
    return tenant


def get_cluster(request: Request) -> Cluster:
    cluster: Cluster = request.app.state.cluster
    return cluster


TenantDep = Annotated[str, Depends(get_tenant)]
ClusterDep = Annotated[Cluster, Depends(get_cluster)]
