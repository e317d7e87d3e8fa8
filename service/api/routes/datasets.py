"""/v1/datasets: `rcm data prepare` as a service operation, run on the cluster (workers/prepare.py).

`POST /v1/datasets` writes an rcm-latents-v1 dataset to the caller's input prefix, datasets/<name>/, so that its
URI works as `data.uri` of a job. Every URI in the request must lie under the caller's input prefix (checked
before anything reads it); a name whose folder already holds files, or whose preparation is queued or running,
is refused with 409 (nothing stored is overwritten: the worker refuses a folder holding a dataset too).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Response, status
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session

from service import operations
from service.api.deps import ClusterDep, SessionDep, TenantDep
from service.api.errors import error_responses
from service.cluster import Cluster
from service.datasets import MANIFEST_NAME, MAX_MANIFEST_BYTES
from service.db import Operation
from service.inputs import input_key, input_prefix_uri, inside
from service.operations import DATASET_NAME, DatasetCreate, DatasetPublic, OperationState
from service.schemas import ErrorPublic
from service.settings import get_settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
KIND = "dataset"
_NOT_FOUND = {404: {"model": ErrorPublic, "description": "No dataset preparation of this name for this tenant"}}
NameParam = Annotated[str, Path(pattern=DATASET_NAME, description="the dataset's name (datasets/<name>/)")]


def dataset_uri(tenant: str, name: str) -> str:
    return input_prefix_uri(get_settings(), tenant) + f"datasets/{name}/"


def _public(op: Operation) -> DatasetPublic:
    return DatasetPublic(
        id=op.id,
        name=op.name or "",
        uri=op.request["out_uri"],
        state=OperationState(op.state),
        count=(op.result or {}).get("count"),
        failure_reason=op.failure_reason,
        request=op.request,
        created_at=op.created_at,
        updated_at=op.updated_at,
    )


def _finished(cluster: Cluster):
    def read(op: Operation) -> dict[str, Any] | None:
        bucket, _, prefix = op.request["out_uri"].removeprefix("s3://").partition("/")
        raw = cluster.read_input(bucket, prefix + MANIFEST_NAME, MAX_MANIFEST_BYTES)
        try:
            manifest = json.loads(raw) if raw else None
        except ValueError:
            return None
        count = manifest.get("count") if isinstance(manifest, dict) else None
        return {"count": count} if isinstance(count, int) else None

    return read


def _refresh_pending(session: Session, tenant: str, cluster: Cluster) -> list[Operation]:
    ops = operations.pending(session, tenant, KIND)
    for op in ops:
        operations.refresh(cluster, op, _finished(cluster))
    session.commit()
    return [op for op in ops if OperationState(op.state) not in operations.DONE]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DatasetPublic,
    responses={
        **error_responses(400, 401, 413, 429, 503),
        409: {"model": ErrorPublic, "description": "A dataset of this name exists or is being prepared"},
    },
)
def create_dataset(
    body: DatasetCreate, response: Response, session: SessionDep, tenant: TenantDep, cluster: ClusterDep
) -> DatasetPublic:
    """Queue `rcm data prepare` on the cluster (202): prompt file + pipeline -> datasets/<name>/ of your inputs."""
    settings = get_settings()
    prefix = input_prefix_uri(settings, tenant)
    errors = [
        {
            "type": "value_error",
            "loc": ("body", field, "uri"),
            "msg": f"Value error, must be an object under your input prefix {prefix} (PUT /v1/inputs/NAME)",
            "input": ref.uri,
        }
        for field, ref in (("prompts", body.prompts), ("pipeline", body.pipeline))
        if not inside(ref.uri, prefix)
    ]
    if errors:  # refused before anything reads them
        raise RequestValidationError(errors)
    pending = _refresh_pending(session, tenant, cluster)
    if any(op.name == body.name for op in pending):
        raise HTTPException(status.HTTP_409_CONFLICT, f"dataset {body.name} is being prepared already")
    out = dataset_uri(tenant, body.name)
    if cluster.list_inputs(settings.INPUTS_BUCKET, input_key(settings, tenant, f"datasets/{body.name}/")):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"datasets/{body.name}/ already holds files: choose another name (nothing is overwritten)",
        )
    cap = settings.MAX_PENDING_DATASETS_PER_TENANT
    if len(pending) >= cap:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"{cap} dataset preparations of this tenant are queued or running: wait for one to finish",
            {"Retry-After": "30"},
        )
    request = {
        **body.model_dump(mode="json", exclude={"prompts", "pipeline"}, exclude_none=True),
        "prompts_uri": body.prompts.uri,
        "pipeline_uri": body.pipeline.uri,
        "out_uri": out,
    }
    op = operations.create(session, tenant, KIND, request, name=body.name)
    try:
        operations.submit(cluster, op, settings.PREPARE_ENTRYPOINT, {"RCM_DATASET_REQUEST": json.dumps(request)})
    except Exception:
        session.rollback()  # nothing queued: nothing stored
        raise
    session.commit()
    response.headers["Location"] = f"/v1/datasets/{body.name}"
    return _public(op)


@router.get("/{name}", response_model=DatasetPublic, responses=error_responses(401, 429, 503) | _NOT_FOUND)
def read_dataset(name: NameParam, session: SessionDep, tenant: TenantDep, cluster: ClusterDep) -> DatasetPublic:
    """The latest preparation of this dataset: QUEUED, RUNNING, SUCCEEDED (count; use `uri` as data.uri) or FAILED."""
    op = operations.latest_named(session, tenant, KIND, name)
    if op is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dataset preparation named {name}")
    operations.refresh(cluster, op, _finished(cluster))
    session.commit()
    return _public(op)
