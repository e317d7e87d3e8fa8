"""Operations: work a tenant asks for besides training, each run on the cluster as one Ray job through the same
Jobs API path as training jobs (never in the API process): sample previews of a job (`POST /v1/jobs/{id}/samples`,
workers/samples.py) and dataset preparation (`POST /v1/datasets`, workers/prepare.py).

This module holds their request/response models, their rows in the store (service.db.Operation) and the state
refresh: an operation's state is read from Ray when someone asks (GET, or the pending count at POST), not by the
reconciler, since nothing has to happen when it ends; its outputs are in S3 and the API reads them then
(a sample request's result.json, a dataset's manifest.json, both written last by the worker).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Annotated, Any, Literal

import httpx
from pydantic import BaseModel, Field, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.cluster import LOST, Cluster, ClusterUnavailable
from service.db import Operation
from service.schemas import UtcDatetime, _Strict

# Bounds of one sample request: a preview, not an evaluation (16 prompts x 8 images at 8 steps on a 14B student is
# already minutes of GPU time).
MAX_SAMPLE_PROMPTS = 16
MAX_SAMPLE_STEPS = 8
MAX_SAMPLES_PER_PROMPT = 8
MAX_CAPTION_CHARS = 300
DATASET_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._\-]{0,63}$"  # one segment of the tenant's input prefix: datasets/<name>/


class OperationState(StrEnum):
    QUEUED = "QUEUED"  # submitted; Ray has not started it (PENDING: waiting for a CPU)
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"  # its outputs are in S3
    FAILED = "FAILED"  # failure_reason says why


DONE = (OperationState.SUCCEEDED, OperationState.FAILED)


class SampleCreate(_Strict):
    prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_CAPTION_CHARS)]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_SAMPLE_PROMPTS,
        description="shapes jobs (a built-in text encoder): captions of the shapes grammar, one grid row each",
    )
    prompt_embeds_uri: str | None = Field(
        None,
        description="diffusers jobs (Wan2.1 / Cosmos-Predict2): a .safetensors under your input prefix with the "
        "encoded prompts, as `rcm sample --prompt-embeds` takes it: tokens (B, L, D), optional mask (B, L) and "
        f"noise (B, C, F, H, W); at most {MAX_SAMPLE_PROMPTS} prompts",
    )
    steps: int = Field(4, ge=1, le=MAX_SAMPLE_STEPS, description="student sampling steps")
    num_samples: int = Field(
        4, ge=1, le=MAX_SAMPLES_PER_PROMPT, description="shapes: images per prompt (diffusers: one per prompt)"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seeds the noise (and the re-noising between steps)")

    @field_validator("prompt_embeds_uri")
    @classmethod
    def _embeds_uri(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("s3://") and len(v) <= 1024 and not v.endswith("/")):
            raise ValueError("must be s3://bucket/key of a .safetensors file under your input prefix")
        return v

    @model_validator(mode="after")
    def _one_prompt_source(self) -> SampleCreate:
        if (self.prompts is None) == (self.prompt_embeds_uri is None):
            raise ValueError("give either prompts (captions) or prompt_embeds_uri (encoded prompts), not both")
        return self


class SamplePublic(BaseModel):
    id: str
    job_id: str
    state: OperationState
    step: int | None = Field(None, description="the training step of the checkpoint sampled (once it succeeded)")
    files: dict[str, str] = Field(
        default_factory=dict,
        description="once SUCCEEDED: file name -> API path to download it (grid.png: the preview grid; "
        "samples.safetensors: shapes images as uint8 (N, H, W, 3), diffusers latents (B, C, F, H, W))",
    )
    failure_reason: str | None
    request: dict[str, Any]
    created_at: UtcDatetime
    updated_at: UtcDatetime


class UriRef(_Strict):
    uri: str = Field(min_length=6, max_length=1024)


class DatasetCreate(_Strict):
    name: str = Field(
        pattern=DATASET_NAME, description="the dataset is written to <your input prefix>datasets/<name>/ (must be new)"
    )
    prompts: UriRef = Field(description="prompt file under your input prefix: UTF-8, one prompt per line")
    pipeline: UriRef = Field(
        description="diffusers pipeline folder s3://.../ under your input prefix (model_index.json, tokenizer/, "
        "text_encoder/, vae/; transformer/ with synthesize), as WanPipeline.save_pretrained writes it"
    )
    synthesize: bool = Field(False, description="latents = the teacher transformer's samples (else prompts only)")
    latent_shape: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None, min_length=4, max_length=4, description="with synthesize (required): C, F, H, W of each latent"
    )
    steps: int = Field(50, ge=1, le=1000, description="with synthesize: teacher Euler steps")
    guidance: float | None = Field(
        None, ge=0, le=20, description="with synthesize: CFG scale as the pipeline takes it (default the family's)"
    )
    negative_prompt: str | None = Field(None, max_length=2000, description="with synthesize: default the pipeline's")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="with synthesize: sample i's noise is seeded seed + i")
    max_sequence_length: int = Field(512, ge=1, le=4096, description="text tokens per prompt")
    samples_per_shard: int = Field(256, ge=1, le=100_000)
    batch_size: int = Field(8, ge=1, le=1024, description="prompts per encoder / sampler batch")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("prompts")
    @classmethod
    def _file(cls, v: UriRef) -> UriRef:
        if not v.uri.startswith("s3://") or v.uri.endswith("/"):
            raise ValueError("uri must be s3://bucket/key of a file under your input prefix")
        return v

    @field_validator("pipeline")
    @classmethod
    def _folder(cls, v: UriRef) -> UriRef:
        if not (v.uri.startswith("s3://") and v.uri.endswith("/")):
            raise ValueError("uri must be a folder s3://bucket/prefix/ (ending in /) under your input prefix")
        return v

    @model_validator(mode="after")
    def _synthesis_fields(self) -> DatasetCreate:
        if self.synthesize and self.latent_shape is None:
            raise ValueError("latent_shape [C, F, H, W] is required with synthesize")
        if not self.synthesize:
            for name in ("latent_shape", "guidance", "negative_prompt"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is only valid with synthesize")
        return self


class DatasetPublic(BaseModel):
    id: str = Field(description="the preparation request")
    name: str
    uri: str = Field(description="the dataset's folder: use it as data.uri of a job once SUCCEEDED")
    state: OperationState
    count: int | None = Field(None, description="samples in the dataset (its manifest, once SUCCEEDED)")
    failure_reason: str | None
    request: dict[str, Any]
    created_at: UtcDatetime
    updated_at: UtcDatetime


# -- store -----------------------------------------------------------------------------------------------------
def create(session: Session, tenant: str, kind: str, request: dict[str, Any], **fields: Any) -> Operation:
    op = Operation(
        id=str(uuid.uuid4()), tenant=tenant, kind=kind, state=OperationState.QUEUED, request=request, **fields
    )
    session.add(op)
    return op


def get(session: Session, tenant: str, kind: str, op_id: str) -> Operation | None:
    op = session.get(Operation, op_id)
    return op if op is not None and op.tenant == tenant and op.kind == kind else None


def latest_named(session: Session, tenant: str, kind: str, name: str) -> Operation | None:
    q = select(Operation).where(Operation.tenant == tenant, Operation.kind == kind, Operation.name == name)
    return session.scalars(q.order_by(Operation.created_at.desc(), Operation.id.desc()).limit(1)).first()


def pending(session: Session, tenant: str, kind: str) -> list[Operation]:
    q = select(Operation).where(
        Operation.tenant == tenant, Operation.kind == kind, Operation.state.not_in([s.value for s in DONE])
    )
    return list(session.scalars(q))


# -- state from Ray --------------------------------------------------------------------------------------------
@contextmanager
def _ray_errors() -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError as exc:
        raise ClusterUnavailable(f"cluster unavailable ({type(exc).__name__})") from exc


def submit(cluster: Cluster, op: Operation, entrypoint: str, env: dict[str, str]) -> None:
    """Hand the operation to the cluster (ClusterUnavailable when it does not answer: nothing was queued)."""
    with _ray_errors():
        op.ray_submission_id = cluster.submit_task(f"rcm-{op.kind[0]}-{op.id}", entrypoint, env)


def refresh(cluster: Cluster, op: Operation, finished: Any) -> None:
    """Bring a not yet finished operation's state up to date with Ray. `finished(op)` is called once Ray says it
    SUCCEEDED: it returns the result (read from S3), or None when the outputs are not there (then FAILED)."""
    if OperationState(op.state) in DONE or op.ray_submission_id is None:
        return
    with _ray_errors():
        status = cluster.status(op.ray_submission_id)
    if status.status == "PENDING":
        op.state = OperationState.QUEUED
    elif status.status == "RUNNING":
        op.state = OperationState.RUNNING
    elif status.status == "SUCCEEDED":
        result = finished(op)
        if result is None:
            op.state, op.failure_reason = OperationState.FAILED, "the worker ended without writing its outputs"
        else:
            op.state, op.result = OperationState.SUCCEEDED, result
    else:
        reason = "the cluster lost it (Ray restarted); submit it again" if status.status == LOST else None
        op.state = OperationState.FAILED
        op.failure_reason = reason or status.message or f"the worker ended {status.status}"
