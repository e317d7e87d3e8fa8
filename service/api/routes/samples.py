"""/v1/jobs/{id}/samples: a preview grid from a job's latest checkpoint, run on the cluster (workers/samples.py).

Tenant-scoped like every job route (another tenant's job is a 404), bounded (SampleCreate's limits; at most
MAX_PENDING_SAMPLES_PER_TENANT requests queued or running per tenant, then 429), refused with 409 while the job
has no complete checkpoint. A prompt-embeddings file must lie under the caller's input prefix (checked before
anything reads it). Outputs are stored under the job's prefix in the checkpoint bucket and downloaded through
the API (tenants have no access to that bucket).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Response, status
from sqlalchemy.orm import Session

from service import crud, operations
from service.api.deps import ClusterDep, SessionDep, TenantDep
from service.api.errors import error_responses, validation_error
from service.api.routes.jobs import job_or_404
from service.cluster import Cluster
from service.db import Job, Operation
from service.inputs import input_prefix_uri, inside
from service.operations import OperationState, SampleCreate, SamplePublic
from service.schemas import DIFFUSERS_DATASETS, ErrorPublic
from service.settings import get_settings

router = APIRouter(prefix="/v1/jobs", tags=["samples"])
KIND = "samples"
FILES = ("grid.png", "samples.safetensors")
MEDIA_TYPES = {"grid.png": "image/png", "samples.safetensors": "application/octet-stream"}
MAX_EMBEDS_BYTES = 256 * 2**20  # 16 prompts x 512 tokens x 4096 floats is 128 MiB
MAX_FILE_BYTES = 512 * 2**20  # 16 Wan 480p x 81-frame latents in float32 are 134 MiB
RESULT = "result.json"


def samples_prefix(job_id: str, sample_id: str) -> str:
    """Where the worker writes (workers/samples.py: the same)."""
    return f"jobs/{job_id}/samples/{sample_id}/"


def _public(op: Operation) -> SamplePublic:
    result = op.result or {}
    base = f"/v1/jobs/{op.job_id}/samples/{op.id}/"
    return SamplePublic(
        id=op.id,
        job_id=op.job_id or "",
        state=OperationState(op.state),
        step=result.get("step"),
        files={name: base + name for name in result.get("files", {})},
        failure_reason=op.failure_reason,
        request=op.request,
        created_at=op.created_at,
        updated_at=op.updated_at,
    )


def _finished(cluster: Cluster):
    def read(op: Operation) -> dict[str, Any] | None:
        key = samples_prefix(op.job_id or "", op.id) + RESULT
        raw = cluster.read_input(get_settings().CHECKPOINT_BUCKET, key, 1 << 16)
        try:
            result = json.loads(raw) if raw else None
        except ValueError:
            return None
        return result if isinstance(result, dict) and isinstance(result.get("files"), dict) else None

    return read


def _check_prompts(job: Job, body: SampleCreate, tenant: str, cluster: Cluster) -> None:
    """What the job's task takes: captions (shapes, a built-in encoder) or an embeddings file (diffusers)."""
    dataset = job.spec.get("data", {}).get("dataset", "latents" if job.spec.get("data", {}).get("uri") else "ring8")
    if dataset == "shapes":
        if body.prompt_embeds_uri is not None:
            raise validation_error(("body", "prompt_embeds_uri"), "a shapes job takes captions: give prompts instead")
        return
    if dataset not in DIFFUSERS_DATASETS:
        raise validation_error(("body",), f"a 2-D job (data.dataset {dataset}) takes no prompts: nothing to preview")
    uri, loc = body.prompt_embeds_uri, ("body", "prompt_embeds_uri")
    if uri is None:
        raise validation_error(loc, "a diffusers job takes encoded prompts: give prompt_embeds_uri (.safetensors)")
    settings = get_settings()
    prefix = input_prefix_uri(settings, tenant)
    if not inside(uri, prefix):
        raise validation_error(loc, f"must be an object under your input prefix {prefix} (PUT /v1/inputs/NAME)")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    found = [o for o in cluster.list_inputs(bucket, key) if o["key"] == key]
    if not found:
        raise validation_error(loc, "no such input (upload it with PUT /v1/inputs/NAME)")
    if found[0]["size"] > MAX_EMBEDS_BYTES:
        raise validation_error(loc, f"over {MAX_EMBEDS_BYTES} bytes: a preview takes a few prompts")


def _pending(session: Session, tenant: str, cluster: Cluster) -> int:
    ops = operations.pending(session, tenant, KIND)
    for op in ops:
        operations.refresh(cluster, op, _finished(cluster))
    session.commit()
    return sum(OperationState(op.state) not in operations.DONE for op in ops)


@router.post(
    "/{job_id}/samples",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SamplePublic,
    responses={
        **error_responses(400, 401, 404, 413, 429, 503),
        409: {"model": ErrorPublic, "description": "The job has no complete checkpoint yet"},
    },
)
def create_samples(
    job_id: str, body: SampleCreate, response: Response, session: SessionDep, tenant: TenantDep, cluster: ClusterDep
) -> SamplePublic:
    """Queue a preview of the job's latest checkpoint for the given prompts (202); poll its URL for the grid."""
    settings = get_settings()
    job = job_or_404(session, tenant, job_id)
    _check_prompts(job, body, tenant, cluster)
    cap = settings.MAX_PENDING_SAMPLES_PER_TENANT
    if _pending(session, tenant, cluster) >= cap:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"{cap} sample requests of this tenant are queued or running: wait for one to finish",
            {"Retry-After": "10"},
        )
    checkpoints = cluster.checkpoints(job.id)
    effective = crud.effective_config(session, job.id) or cluster.effective_config(job.id)
    if not checkpoints or effective is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"job {job.id} has no checkpoint yet (state {job.state}): samples come from its latest complete "
            "checkpoint; retry once GET /v1/jobs/{id}/checkpoints lists one",
        )
    request = body.model_dump(mode="json", exclude_none=True)
    op = operations.create(session, tenant, KIND, request, job_id=job.id)
    teacher = effective.get("teacher", {})
    env = {
        "RCM_JOB_ID": job.id,
        "RCM_JOB_SPEC": json.dumps(job.spec),
        "RCM_SAMPLE_ID": op.id,
        "RCM_SAMPLE_REQUEST": json.dumps(request),
        "RCM_TEACHER_URI": str(teacher.get("uri") or job.spec["teacher"]["uri"]),
        "RCM_TEACHER_FAMILY": str(teacher.get("family") or ""),
    }
    try:
        operations.submit(cluster, op, settings.SAMPLES_ENTRYPOINT, env)
    except Exception:
        session.rollback()  # nothing queued: nothing stored
        raise
    session.commit()
    response.headers["Location"] = f"/v1/jobs/{job.id}/samples/{op.id}"
    return _public(op)


def _sample_or_404(session: Session, tenant: str, job_id: str, sample_id: str) -> Operation:
    job = job_or_404(session, tenant, job_id)
    op = operations.get(session, tenant, KIND, sample_id)
    if op is None or op.job_id != job.id:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such sample request for this job")
    return op


@router.get("/{job_id}/samples/{sample_id}", response_model=SamplePublic, responses=error_responses(401, 404, 429, 503))
def read_samples(
    job_id: str, sample_id: str, session: SessionDep, tenant: TenantDep, cluster: ClusterDep
) -> SamplePublic:
    """State of a sample request (QUEUED, RUNNING, SUCCEEDED with its files, FAILED with the reason)."""
    op = _sample_or_404(session, tenant, job_id, sample_id)
    operations.refresh(cluster, op, _finished(cluster))
    session.commit()
    return _public(op)


@router.get(
    "/{job_id}/samples/{sample_id}/{file}",
    response_class=Response,
    responses={
        200: {
            "description": "the file",
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {},
            },
        },
        **error_responses(401, 404, 429, 503),
        409: {"model": ErrorPublic, "description": "The sample request has not succeeded (yet)"},
    },
)
def download_samples(
    job_id: str,
    sample_id: str,
    file: Annotated[Literal["grid.png", "samples.safetensors"], Path(description="grid.png or samples.safetensors")],
    session: SessionDep,
    tenant: TenantDep,
    cluster: ClusterDep,
) -> Response:
    """Download a finished sample request's grid (PNG) or samples (safetensors)."""
    op = _sample_or_404(session, tenant, job_id, sample_id)
    operations.refresh(cluster, op, _finished(cluster))
    session.commit()
    if op.state != OperationState.SUCCEEDED:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"the sample request is {op.state}: its files exist once SUCCEEDED"
        )
    body = cluster.read_input(
        get_settings().CHECKPOINT_BUCKET, samples_prefix(op.job_id or "", op.id) + file, MAX_FILE_BYTES
    )
    if body is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{file} is no longer stored")
    return Response(content=body, media_type=MEDIA_TYPES[file])
