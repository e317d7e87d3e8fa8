"""The job spec (the service's JobCreate, as JSON) <-> rcm_core's dataclasses: one conversion each way.

The REST schema declares what a user may set; rcm_core's dataclasses (through the task's preset) hold every
default. The service stores only the fields a user set, so `job_config` starts from the preset of the
dataset's task and overrides exactly those fields. Fields are routed by name, the same name at every layer:
a spec section maps onto the dataclass(es) below, and a field lands in whichever of them declares it, so a
new method field is declared twice: once in the schema (bounds, API text), once in its dataclass (default).
`effective_spec` is the inverse: the settings that actually ran, in the spec's shape (recorded in MLflow and
returned by the API).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from rcm_core.config import (
    ConfigError,
    DataConfig,
    DistillConfig,
    EvalConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    config_from_dict,
)
from rcm_core.parallel.parallel_dims import ParallelConfig
from rcm_core.tasks import task_for_dataset

# spec section -> DistillConfig sections whose fields it carries
SECTIONS: dict[str, dict[str, type]] = {
    "teacher": {"teacher": TeacherConfig},
    "student": {"student": StudentConfig},  # student.lora: a LoRA student (rcm_core.teachers.lora)
    "data": {"data": DataConfig},
    "method": {"loss": LossConfig, "optim": OptimConfig},
    "schedule": {"train": TrainConfig},
    "eval": {"eval": EvalConfig},
}
# spec fields the worker itself handles (inputs to fetch, the cluster's shape); `resources` goes to ParallelConfig
WORKER_FIELDS = {
    "teacher": {"uri"},
    "data": {"prompt_file_uri"},
    "resources": {"num_workers", "use_gpu"},
    "export": {"registered_model_name", "max_shard_size", "dtype"},  # workers/train_loop.py's export
}
DEFAULT_MAX_SHARD_SIZE = "5GB"  # diffusers' save_pretrained default
JOB_SECTIONS = {"name", "tracking"}  # the service's own (naming, tracking); nothing to train by
# dataclass fields that are local paths of this worker, never part of what a user sets or sees
LOCAL_FIELDS = {"teacher": {"path"}, "data": {"prompt_file", "pool_size"}, "train": {"output_dir"}}


@dataclass(kw_only=True)
class JobConfig:
    """A job spec, converted once: nothing reads the raw dict after this."""

    distill: DistillConfig
    parallel: ParallelConfig
    teacher_uri: str  # s3://bucket/key or builtin:<task>
    prompt_file_uri: str | None
    num_workers: int
    use_gpu: bool
    registered_model_name: str | None = None  # MLflow Model Registry: the export becomes a new version of it
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE  # save_pretrained's shard size of the exported transformer
    export_dtype: str = "float32"  # float32 | bfloat16: the exported weights (diffusers' keep-in-fp32 modules stay)


def job_config(
    spec: dict[str, Any],
    *,
    output_dir: str,
    teacher_path: str | None = None,
    prompt_file: str | None = None,
    teacher_family: str | None = None,
) -> JobConfig:
    """The spec (only the fields its user set) on top of its task's preset.

    Args:
        teacher_path / prompt_file: local copies the worker downloaded (None before they are fetched).
        teacher_family: a diffusers teacher's family as read from its config.json (workers.entrypoint), when
            the spec leaves teacher.family out; the preset's defaults depend on it (e.g. the guidance scale).
    Raises:
        ConfigError: naming the spec field (e.g. "method.critic_ratio: ...").
    """
    unknown = set(spec) - set(SECTIONS) - set(WORKER_FIELDS) - JOB_SECTIONS
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown section")
    dataset = spec.get("data", {}).get("dataset") or DataConfig().dataset
    task = task_for_dataset(dataset)
    update: dict[str, dict[str, Any]] = {}
    for section, targets in SECTIONS.items():
        for key, value in spec.get(section, {}).items():
            if value is None or key in WORKER_FIELDS.get(section, ()):
                continue
            target = next((name for name, cls in targets.items() if key in _field_names(cls)), None)
            if target is None:
                raise ConfigError(f"{section}.{key}: unknown field")
            update.setdefault(target, {})[key] = value
    family = spec.get("teacher", {}).get("family") or teacher_family
    if family is not None:
        update.setdefault("teacher", {})["family"] = family
    update.setdefault("teacher", {})["path"] = teacher_path
    update.setdefault("data", {})["prompt_file"] = prompt_file
    update.setdefault("train", {})["output_dir"] = output_dir
    try:
        distill = config_from_dict({"task": task.name, **update}, base=task.preset(family))
    except ConfigError as exc:
        raise ConfigError(_spec_path(str(exc))) from None
    resources = spec.get("resources", {})
    parallel_fields = {k: v for k, v in resources.items() if k not in WORKER_FIELDS["resources"]}
    try:
        parallel = ParallelConfig(**parallel_fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"resources: {exc}") from None
    num_workers = resources.get("num_workers", 1)
    fsdp = parallel.fsdp_degree if parallel.fsdp_degree > 0 else num_workers // parallel.cp_degree
    if distill.train.batch_size % max(fsdp, 1):
        raise ConfigError(
            f"schedule.batch_size ({distill.train.batch_size}) must be divisible by resources.fsdp_degree ({fsdp})"
        )
    return JobConfig(
        distill=distill,
        parallel=parallel,
        teacher_uri=spec.get("teacher", {}).get("uri", f"builtin:{task.name}"),
        prompt_file_uri=spec.get("data", {}).get("prompt_file_uri"),
        num_workers=num_workers,
        use_gpu=resources.get("use_gpu", False),
        registered_model_name=spec.get("export", {}).get("registered_model_name"),
        max_shard_size=spec.get("export", {}).get("max_shard_size") or DEFAULT_MAX_SHARD_SIZE,
        export_dtype=spec.get("export", {}).get("dtype") or "float32",
    )


def effective_spec(job: JobConfig) -> dict[str, Any]:
    """What the job runs with, in the spec's shape and names (the inverse of `job_config`)."""
    cfg = job.distill
    out: dict[str, Any] = {}
    for section, targets in SECTIONS.items():
        fields: dict[str, Any] = {}
        for name in targets:
            value = getattr(cfg, name)
            hidden = LOCAL_FIELDS.get(name, set())
            fields |= {k: v for k, v in dataclasses.asdict(value).items() if k not in hidden}
        out[section] = fields
    out["teacher"]["uri"] = job.teacher_uri
    out["data"]["prompt_file_uri"] = job.prompt_file_uri
    parallel = dataclasses.asdict(job.parallel)
    out["resources"] = {"num_workers": job.num_workers, "use_gpu": job.use_gpu, **parallel}
    out["export"] = {
        "registered_model_name": job.registered_model_name,
        "max_shard_size": job.max_shard_size,
        "dtype": job.export_dtype,
    }
    return out


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


_SPEC_SECTION = {inner: outer for outer, targets in SECTIONS.items() for inner in targets}


def _spec_path(message: str) -> str:
    """ConfigError text names DistillConfig paths (loss.x, train.y); the user wrote method.x, schedule.y."""
    m = re.match(r"^(\w+)([.:].*)$", message, re.S)
    return f"{_SPEC_SECTION[m.group(1)]}{m.group(2)}" if m and m.group(1) in _SPEC_SECTION else message
