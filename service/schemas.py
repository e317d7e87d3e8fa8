"""The job spec (the JSON contract between the API and the workers) and the API's response models.

This schema is the one declaration of what a user may set (and its bounds). Fields of the method, schedule,
teacher and evaluation that a request leaves out are filled by the worker from the task's preset (rcm_core:
e.g. the paper's lambda = 0.01, 4 critic updates; the shapes task: 2 critic updates, lr 1e-4): the service stores
only what the user set, and a job's `effective_config` shows what actually ran. The worker turns the stored dict
into rcm_core dataclasses once (`workers.spec.job_config`).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

BUILTIN_TEACHERS = {"toy2d": "builtin:toy2d", "shapes": "builtin:shapes"}  # name -> URI
_URI = re.compile(r"^(s3://[a-z0-9][a-z0-9.\-]{1,62}/.+|builtin:[a-z0-9\-]+)$")


class JobState(StrEnum):
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"


TERMINAL_STATES = {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}


class _Strict(BaseModel):
    # Finite floats only: NaN/Infinity (JSON tokens, or 1e999) would reach the worker as a non-finite
    # hyperparameter and could not even be echoed back in a JSON error body.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


TEACHER_FAMILIES = ("wan2.1", "cosmos-predict2")  # diffusers families (service/teachers.py: their classes)


def is_teacher_folder(uri: str) -> bool:
    """A diffusers transformer folder (s3://bucket/prefix/, ending in /) rather than one teacher file."""
    return uri.startswith("s3://") and uri.endswith("/")


class TeacherSpec(_Strict):
    uri: str = Field(
        description="s3://bucket/key.safetensors (written by `rcm teacher train`), s3://bucket/prefix/ (a diffusers "
        "transformer folder as save_pretrained writes it: config.json + safetensors, with data.dataset "
        "teacher-synthetic), builtin:toy2d (the 2-D teacher, trained on first use) or builtin:shapes (the "
        "text-to-image teacher shipped with rcm_core)"
    )
    family: Literal["wan2.1", "cosmos-predict2"] | None = Field(
        None,
        description="diffusers teachers: the family, checked against config.json's _class_name (wan2.1: "
        "WanTransformer3DModel, cosmos-predict2: CosmosTransformer3DModel); default: read from config.json",
    )
    parameterization: Literal["rf", "trigflow"] | None = None
    guidance_scale: float | None = Field(
        None,
        ge=0,
        le=20,
        description="CFG weight g distilled into the student, in the form F_u + g (F_c - F_u); diffusers teachers "
        "default to their pipeline's (Wan 5.0; Cosmos-Predict2 w = 7 of its D_c + w (D_c - D_u), i.e. g = 8)",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not _URI.match(v):
            raise ValueError("must be s3://bucket/key, s3://bucket/prefix/ or builtin:NAME")
        if v.startswith("builtin:") and v.removeprefix("builtin:") not in BUILTIN_TEACHERS:
            raise ValueError(f"unknown built-in teacher {v!r}: one of {', '.join(BUILTIN_TEACHERS.values())}")
        return v

    @model_validator(mode="after")
    def _family_needs_a_folder(self) -> TeacherSpec:
        if self.family is not None and not is_teacher_folder(self.uri):
            raise ValueError("family is only valid for a diffusers transformer folder (teacher.uri s3://.../ ending /)")
        if is_teacher_folder(self.uri) and self.parameterization is not None:
            raise ValueError("parameterization is set by the diffusers family, not by the job")
        return self


LORA_MAX_RANK = 1024  # rcm_core.config.LORA_MAX_RANK


class LoraSpec(_Strict):
    """A LoRA student: the teacher's weights frozen, adapters on the named block linears; only the adapters train
    and are exported (diffusers' pytorch_lora_weights.safetensors, for load_lora_weights / load_lora_adapter)."""

    rank: int = Field(ge=1, le=LORA_MAX_RANK, description="r of the low-rank update B A")
    alpha: float = Field(gt=0, le=4 * LORA_MAX_RANK, description="the update is scaled by alpha / rank")
    target_modules: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]{1,64}$")]] = Field(
        min_length=1,
        max_length=16,
        description="block linears by their diffusers names (peft matches a name as the end of a module path): "
        "to_q, to_k, to_v, to_out.0 (both attentions), attn1.to_q ... attn2.to_out.0 (one), and the feed-forward's "
        "ffn.net.0.proj, ffn.net.2 (Wan2.1) or ff.net.0.proj, ff.net.2 (Cosmos-Predict2); checked against the "
        "teacher's family at submission",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")

    @field_validator("target_modules")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("names must be distinct")
        return v


class StudentSpec(_Strict):
    init: Literal["teacher"] = "teacher"  # the student starts as a copy of the teacher
    lora: LoraSpec | None = Field(
        None,
        description="train a LoRA of the teacher instead of every weight (diffusers teachers); the fake score "
        "stays a full network",
    )


TOY2D_DATASETS = ("ring8", "grid25")  # 2-D mixtures, MLP teacher, CPU only
_PROMPT_PATH = re.compile(r"^(?!/)(?!.*(^|/)\.\.(/|$))[A-Za-z0-9._\-/]{1,512}$")  # relative, no ".."


SYNTHETIC_FIELDS = ("latent_shape", "text_tokens", "num_prompts", "sample_steps")  # teacher-synthetic only


DIFFUSERS_DATASETS = ("teacher-synthetic", "latents")  # the datasets of a diffusers teacher (a folder)


class DataSpec(_Strict):
    dataset: Literal["ring8", "grid25", "shapes", "teacher-synthetic", "latents"] = Field(
        "ring8",
        description="built-in dataset: ring8 | grid25 (2-D mixtures), shapes (text-to-image scenes), "
        "teacher-synthetic (a diffusers teacher's own samples on placeholder prompts: seeded random text "
        "embeddings, not encoded text; README: bring your own Wan / Cosmos teacher), or latents (a stored "
        "rcm-latents-v1 dataset at data.uri; the default when data.uri is given)",
    )
    uri: str | None = Field(
        None,
        description="latents: the dataset's folder s3://bucket/prefix/ under your input prefix (shards + "
        "manifest.json, as `rcm data prepare` writes them); its manifest gives the latent shape and text tokens, "
        "checked against the teacher at submission. A prompts-only dataset (no latents) trains DMD only "
        "(method.scm_weight 0) and needs data.latent_shape for the noise",
    )
    shuffle_buffer: int | None = Field(
        None, ge=1, le=100_000, description="latents: samples in each worker's shuffle buffer; default 64"
    )
    latent_shape: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None,
        min_length=4,
        max_length=4,
        description="teacher-synthetic (required): (C, F, H, W) of one latent, e.g. [16, 21, 60, 104] for Wan2.1 "
        "at 480p x 81 frames; C = the transformer's in_channels, F, H, W divisible by its patch_size",
    )
    text_tokens: int | None = Field(
        None, ge=1, le=4096, description="teacher-synthetic: text tokens per placeholder prompt; default 512"
    )
    num_prompts: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="teacher-synthetic: placeholder prompts, each with one teacher sample drawn at job start; "
        "default 32",
    )
    sample_steps: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="teacher-synthetic: Euler steps (with CFG) of the teacher drawing each sample; default 50",
    )
    prompt_file_uri: str | None = Field(
        None,
        description="shapes only: captions to distill on, one per line; s3://bucket/key, or a path relative to "
        "the prompt directory of the cluster's nodes (RCM_PROMPT_DIR)",
    )

    @model_validator(mode="before")
    @classmethod
    def _uri_means_latents(cls, data: Any) -> Any:
        # `data: {"uri": ...}` alone names a stored dataset: dataset defaults to latents then, not ring8
        if isinstance(data, dict) and data.get("uri") is not None and "dataset" not in data:
            return {**data, "dataset": "latents"}
        return data

    @field_validator("uri")
    @classmethod
    def _dataset_uri(cls, v: str | None) -> str | None:
        if v is not None and not (_URI.match(v) and v.startswith("s3://") and v.endswith("/")):
            raise ValueError("must be a dataset folder s3://bucket/prefix/ (ending in /)")
        return v

    @field_validator("prompt_file_uri")
    @classmethod
    def _prompt_file_uri(cls, v: str | None) -> str | None:
        if v is not None and not (_URI.match(v) and v.startswith("s3://") or _PROMPT_PATH.match(v)):
            raise ValueError("must be s3://bucket/key or a relative path (no leading /, no ..)")
        return v

    @model_validator(mode="after")
    def _fields_fit_the_dataset(self) -> DataSpec:
        if self.prompt_file_uri is not None and self.dataset != "shapes":
            raise ValueError(f"prompt_file_uri is only valid with dataset 'shapes', not {self.dataset!r}")
        if self.dataset == "latents":  # shapes come from the dataset's manifest; latent_shape: prompts-only ones
            if self.uri is None:
                raise ValueError("uri (the dataset's folder s3://bucket/prefix/) is required with dataset 'latents'")
            for name in (n for n in SYNTHETIC_FIELDS if n != "latent_shape" and getattr(self, n) is not None):
                raise ValueError(f"{name} is only valid with dataset 'teacher-synthetic' (latents: the manifest's)")
        elif self.dataset != "teacher-synthetic":
            for name in (n for n in SYNTHETIC_FIELDS if getattr(self, n) is not None):
                raise ValueError(f"{name} is only valid with dataset 'teacher-synthetic', not {self.dataset!r}")
        elif self.latent_shape is None:
            raise ValueError("latent_shape [C, F, H, W] is required with dataset 'teacher-synthetic'")
        if self.dataset != "latents":
            for name in (n for n in ("uri", "shuffle_buffer") if getattr(self, n) is not None):
                raise ValueError(f"{name} is only valid with dataset 'latents', not {self.dataset!r}")
        return self


class MethodSpec(_Strict):
    """Unset fields take the task preset's value (see the job's effective_config)."""

    # Bounds keep every run in a range where the losses can stay finite in float32 (dmd_weight 1e300 made every
    # loss non-finite); they are wide around the paper's values (lambda 0.01, P_mean 0, P_std 1.6), not tuned.
    scm_weight: float | None = Field(None, ge=0, le=10)
    dmd_weight: float | None = Field(None, ge=0, le=10, description="lambda")
    p_mean: float | None = Field(None, ge=-5, le=5, description="mean of the log-normal proposal of log(sigma)")
    p_std: float | None = Field(None, gt=0, le=5, description="std of the log-normal proposal of log(sigma)")
    tangent_warmup_steps: int | None = Field(None, ge=0, le=10_000_000)
    time_derivative: Literal["exact", "semi_continuous"] | None = None
    fd_step: float | None = Field(None, gt=0, lt=0.1)
    max_rollout_steps: int | None = Field(None, ge=1, le=16)
    critic_ratio: int | None = Field(None, ge=1, le=16)
    lr: float | None = Field(None, gt=0, le=1)
    fake_lr: float | None = Field(None, gt=0, le=1)
    ema_sigma_rel: float | None = Field(None, gt=0, lt=0.28)

    @model_validator(mode="after")
    def _some_loss(self) -> MethodSpec:  # what the request says; the worker checks the result with the preset
        if self.scm_weight == 0 and self.dmd_weight == 0:
            raise ValueError("scm_weight and dmd_weight are both 0: nothing to train")
        return self


class ResourcesSpec(_Strict):
    num_workers: int = Field(
        1, ge=1, le=256, description="Ray Train workers, one rank each (one GPU each with use_gpu)"
    )
    use_gpu: bool = Field(False, description="NCCL on one GPU per worker; the 2-D datasets run on CPU only")
    fsdp_degree: int = Field(
        1, ge=1, le=256, description="workers splitting the batch; FSDP2 shards weights over all workers"
    )
    cp_degree: int = Field(
        1,
        ge=1,
        le=256,
        description="workers splitting each sample's tokens (Ulysses, in every DiT block; DiT-based tasks)",
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="per DiT block, wherever the blocks sit in the network (DiT-based tasks)"
    )

    @model_validator(mode="after")
    def _degrees(self) -> ResourcesSpec:
        if self.fsdp_degree * self.cp_degree != self.num_workers:
            raise ValueError(
                f"fsdp_degree ({self.fsdp_degree}) x cp_degree ({self.cp_degree}) "
                f"must equal num_workers ({self.num_workers})"
            )
        return self


class ScheduleSpec(_Strict):
    """Unset fields take the task preset's value (see the job's effective_config)."""

    steps: int | None = Field(None, ge=1, le=10_000_000)
    batch_size: int | None = Field(None, ge=1, le=65536)
    checkpoint_every: int | None = Field(None, ge=1, le=10_000_000)
    log_every: int | None = Field(None, ge=1, le=10_000_000)
    eval_every: int | None = Field(
        None, ge=1, le=10_000_000, description="steps between evaluations (metrics + sample grid in MLflow)"
    )
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1, description="seeds every RNG of the run (a 31-bit value every library takes)"
    )
    max_minutes: float | None = Field(
        None,
        gt=0,
        le=8640,
        description="training-time budget in minutes (wall-clock of the training loop, periodic evaluations and "
        "checkpoint uploads included, summed across worker recoveries): once spent, the job checkpoints, "
        "exports the student and SUCCEEDS with fewer than `steps` steps (MLflow metric time_limit_reached = 1); "
        "default: none. At most 6 days, under a KubeRay deployment's default 7-day activeDeadlineSeconds",
    )


class EvalSpec(_Strict):
    """What the worker evaluates: periodically (student at 1 and 4 steps) and in the final report (teacher at
    teacher_steps Euler steps, student at 1, 2 and 4 steps). Unset fields take the task preset's value."""

    num_samples: int | None = Field(
        None,
        ge=10,
        le=100_000,
        description="samples per sampler and step count in the final report, half of it in periodic evaluations; "
        "default: the preset's 4000 (2-D points) or 126 (shapes images, every benchmark prompt once)",
    )
    diversity_samples: int | None = Field(None, ge=2, le=256, description="shapes: images per diversity prompt")
    teacher_steps: list[int] | None = Field(
        None,
        min_length=1,
        max_length=8,
        description="teacher Euler steps in the final report; default [1, 2, 4, 8, 32] (2-D preset) or [4] (shapes: "
        "CFG doubles the cost; the shipped teacher's stored GPU evaluation at 50 steps is added to the report)",
    )
    student_mid_times: list[float] | None = Field(
        None,
        min_length=1,
        max_length=8,
        description="intermediate TrigFlow times of the student's few-step sampler (n steps: pi/2, then the first "
        "n - 1 of these), strictly decreasing in (0.2, pi/2); default [1.5, 1.4, 1.0] (2-D) or [1.1, 0.8, 0.5] "
        "(shapes)",
    )

    @field_validator("teacher_steps")
    @classmethod
    def _steps(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not all(1 <= s <= 1000 for s in v):
            raise ValueError("every step count must be in [1, 1000]")
        return v

    @field_validator("student_mid_times")
    @classmethod
    def _mid_times(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not all(0.2 < t < math.pi / 2 for t in v):
            raise ValueError("every time must be in (0.2, pi/2)")
        if any(a <= b for a, b in zip(v, v[1:], strict=False)):
            raise ValueError("times must be strictly decreasing")
        return v


class TrackingSpec(_Strict):
    experiment: str = Field("rcm", min_length=1, max_length=128)


class ExportSpec(_Strict):
    registered_model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}\.[A-Za-z0-9_\-]{1,100}$",
        description="register the exported student in the MLflow Model Registry as a new version of this model, "
        "named `<your tenant>.<model>` (the model part without dots); lineage tags: teacher, dataset, job",
    )
    max_shard_size: str = Field(
        "5GB",
        pattern=r"^[1-9][0-9]{0,5}(KB|MB|GB)$",
        description="shard size of the exported transformer's safetensors files (save_pretrained's max_shard_size)",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype of the exported weights (the modules diffusers keeps in float32 stay float32); "
        "float32 reproduces the job's evaluation exactly, bfloat16 halves the size",
    )


class JobCreate(_Strict):
    name: str = Field(min_length=1, max_length=128)
    teacher: TeacherSpec
    student: StudentSpec = StudentSpec()
    data: DataSpec = DataSpec()
    method: MethodSpec = MethodSpec()
    resources: ResourcesSpec = ResourcesSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    eval: EvalSpec = EvalSpec()
    tracking: TrackingSpec = TrackingSpec()
    export: ExportSpec = ExportSpec()

    @model_validator(mode="after")
    def _resources_fit_the_task(self) -> JobCreate:
        r = self.resources
        if self.data.dataset in TOY2D_DATASETS:  # an MLP on CPU: no tokens to split, no blocks to checkpoint
            unavailable = {"cp_degree": 1, "activation_checkpointing": "none", "use_gpu": False}
            for name in (k for k, default in unavailable.items() if getattr(r, k) != default):
                raise ValueError(
                    f"resources.{name}={getattr(r, name)!r} is not available with data.dataset "
                    f"{self.data.dataset!r} (an MLP teacher on CPU)"
                )
        elif self.teacher.uri == "builtin:toy2d":
            raise ValueError(
                f"teacher.uri builtin:toy2d is a 2-D teacher: data.dataset must be one of {TOY2D_DATASETS}"
            )
        if self.data.dataset != "shapes" and self.teacher.uri == "builtin:shapes":
            raise ValueError("teacher.uri builtin:shapes is a text-to-image teacher: data.dataset must be 'shapes'")
        if (self.data.dataset in DIFFUSERS_DATASETS) != is_teacher_folder(self.teacher.uri):
            raise ValueError(
                "a diffusers teacher (teacher.uri s3://bucket/prefix/ ending in /, its transformer folder) goes with "
                "data.dataset 'teacher-synthetic' or 'latents' (data.uri), and those datasets with such a teacher"
            )
        if self.student.lora is not None and self.data.dataset not in DIFFUSERS_DATASETS:
            raise ValueError(
                "student.lora: LoRA students need a diffusers teacher (teacher.uri s3://bucket/prefix/, data.dataset "
                f"'teacher-synthetic' or 'latents'), not data.dataset {self.data.dataset!r}"
            )
        if self.schedule.batch_size is not None and self.schedule.batch_size % r.fsdp_degree:
            raise ValueError(
                f"schedule.batch_size ({self.schedule.batch_size}) must be divisible by resources.fsdp_degree "
                f"({r.fsdp_degree}): each of those workers takes an equal share of the batch"
            )
        return self


def _as_utc(value: dt.datetime) -> dt.datetime:
    # The store keeps naive UTC; responses carry the zone so every timestamp is RFC 3339 (serialised with "Z").
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


UtcDatetime = Annotated[dt.datetime, AfterValidator(_as_utc)]


class InputPublic(BaseModel):
    name: str
    uri: str  # what a job spec names (teacher.uri, data.prompt_file_uri; a teacher folder: the URI up to its last /)
    size: int  # bytes


class CheckpointPublic(BaseModel):
    step: int
    uri: str


class JobPublic(BaseModel):
    id: str
    name: str
    state: JobState
    step: int
    total_steps: int
    metrics: dict[str, float | None] = Field(
        description="latest progress metrics logged by the worker; null where the last logged value was not a "
        "finite number (NaN or infinite)"
    )
    mlflow_run_url: str | None
    failure_reason: str | None
    recovery_count: int
    created_at: UtcDatetime
    updated_at: UtcDatetime
    spec: dict[str, Any]  # the fields the user set
    # every setting the job runs with, in the spec's shape (the task preset filling what `spec` leaves out);
    # null until the worker has resolved it
    effective_config: dict[str, Any] | None = None


class JobsPublic(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None


class JobEventPublic(BaseModel):
    id: int
    created_at: UtcDatetime
    kind: str
    data: dict[str, Any]


class ErrorPublic(BaseModel):
    """Body of every error other than 422: what went wrong, in one line."""

    detail: str


class ReadyPublic(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, bool] = Field(description="per dependency (database, ray, mlflow, s3): whether it answered")
