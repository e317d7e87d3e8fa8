"""The task interface (`Task`), the registry (`register`, `get_task`, `task_for_dataset`) and the evaluation
code every task shares (periodic metrics, the final teacher-vs-student report); see rcm_core.tasks.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from rcm_core.config import ConfigError, DistillConfig
from rcm_core.models.flow import FlowModel

TASKS: dict[str, Task] = {}


class Task:
    """Defaults are for a task whose teacher is a file; subclasses override what differs."""

    name: ClassVar[str]
    datasets: ClassVar[tuple[str, ...]]
    metric_names: ClassVar[tuple[str, ...]]  # the report's per-row metrics that go to MLflow
    uses_cuda: ClassVar[bool] = False  # train.device auto picks CUDA when available
    teacher_is_directory: ClassVar[bool] = False  # the teacher is a folder (diffusers layout), not one file

    # -- config ------------------------------------------------------------------------------------
    def preset(self, family: str | None = None) -> DistillConfig:
        """The task's defaults; `family`: the teacher family they depend on (diffusers teachers), else None."""
        raise NotImplementedError

    # -- teachers ----------------------------------------------------------------------------------
    def teacher_cache_key(self, cfg: DistillConfig) -> str | None:
        """Content key of the built-in teacher `cfg` asks for; None when it ships with the package."""
        return None

    def builtin_teacher(self, cfg: DistillConfig, progress: Callable | None = None) -> tuple[torch.nn.Module, dict]:
        """The built-in teacher: trained here (cache it by `teacher_cache_key`) or loaded from the package."""
        raise NotImplementedError

    def load_teacher(self, path: Path) -> tuple[torch.nn.Module, dict]:
        raise NotImplementedError

    # -- data and evaluation -----------------------------------------------------------------------
    def build_data(self, cfg: DistillConfig, meta: dict, device: torch.device | None, access=None):
        """The data/condition source the Distiller draws from; `access`: where and as which data-parallel rank to
        read a stored dataset (rcm_core.data.latent_stream.DataAccess; None: local, one rank)."""
        raise NotImplementedError

    def prepare_data(self, data, teacher: FlowModel) -> None:
        """Make what the data source draws from the frozen teacher (the Distiller's, sharded or not), once before
        training; every rank calls it. Nothing by default."""

    def evaluate(
        self,
        cfg: DistillConfig,
        entries: list[tuple[str, FlowModel, list[int], bool]],
        data,
        *,
        num_samples: int,
        seed: int,
        grid: Path,
    ) -> list[dict[str, Any]]:
        """Rows (model, steps, metrics...) for entries (name, model, step counts, is_teacher); writes the grid."""
        raise NotImplementedError

    def stored_rows(self, meta: dict, guidance_scale: float) -> list[dict[str, Any]]:
        """Report rows the teacher file carries from its own evaluation (none by default)."""
        return []

    def network_config(self, cfg: DistillConfig, meta: dict) -> dict[str, Any]:
        """What rebuilds the student's network from an exported state dict."""
        raise NotImplementedError

    def write_student(self, out: Path, state: dict[str, torch.Tensor], info: dict[str, Any], meta: dict) -> None:
        """The exported student in `out`: by default student.safetensors + config.json (`info`, which holds
        `network_config`)."""
        from safetensors.torch import save_file

        save_file(state, str(out / "student.safetensors"))
        (out / "config.json").write_text(json.dumps(info, indent=2))

    def format_table(self, rows: list[dict]) -> str:
        raise NotImplementedError


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls()
    return cls


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"task: must be one of {', '.join(TASKS)}; got {name!r}")
    return TASKS[name]


def task_for_dataset(dataset: str) -> Task:
    for task in TASKS.values():
        if dataset in task.datasets:
            return task
    raise ConfigError(f"data.dataset: no task has dataset {dataset!r}")


def content_key(payload: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able config: the name of a cached artifact made from it."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def eval_seed(cfg: DistillConfig) -> int:
    """One evaluation seed for the CLI, the worker and the benchmarks: held apart from the training seed."""
    return cfg.train.seed + 1000


def student_info(cfg: DistillConfig, parameterization: str, meta: dict) -> dict[str, Any]:
    """What an export records about how its student was made and how it samples (rcm.json; the diffusers task
    also builds its sampler record from it): task, parameterization, network config, data, guidance, and the
    evaluation's sampler settings (mid times, step counts, seed)."""
    task = get_task(cfg.task)
    return {
        "task": cfg.task,
        "parameterization": parameterization,
        "model": task.network_config(cfg, meta),  # what rebuilds the student's network
        "data": dict(cfg.data.__dict__),
        "guidance_scale": cfg.teacher.guidance_scale,
        # a LoRA student (rcm_core.teachers.lora): its rank, alpha, targets; the export holds the adapters alone
        "lora": None if cfg.student.lora is None else dict(cfg.student.lora.__dict__),
        "eval": {
            "student_mid_times": list(cfg.eval.student_mid_times),
            "student_steps": list(cfg.eval.student_steps),
            "seed": eval_seed(cfg),
        },
    }


def periodic_metrics(cfg: DistillConfig, student: FlowModel, data, grid: Path) -> dict[str, float]:
    """The EMA student at 1 and 4 steps on half of cfg.eval.num_samples; metrics named eval/<N>step/<metric>."""
    task = get_task(cfg.task)
    n = max(10, cfg.eval.num_samples // 2)
    rows = task.evaluate(
        cfg, [("student (EMA)", student, [1, 4], False)], data, num_samples=n, seed=eval_seed(cfg), grid=grid
    )
    return student_metrics(task, rows)


def final_report(
    cfg: DistillConfig, teacher: FlowModel, student: FlowModel, data, meta: dict, grid: Path
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Teacher (cfg.eval.teacher_steps) vs EMA student (cfg.eval.student_steps) on cfg.eval.num_samples.

    Returns:
        (the report's rows, stored teacher rows first; the student's metrics named eval/<N>step/<metric>)
    """
    task, e = get_task(cfg.task), cfg.eval
    w = cfg.teacher.guidance_scale
    entries = [(f"teacher (Euler, CFG {w:g})", teacher, e.teacher_steps, True)]
    entries.append(("student (EMA)", student, e.student_steps, False))
    rows = task.evaluate(cfg, entries, data, num_samples=e.num_samples, seed=eval_seed(cfg), grid=grid)
    return task.stored_rows(meta, w) + rows, student_metrics(task, rows)


def student_metrics(task: Task, rows: list[dict[str, Any]]) -> dict[str, float]:
    return {
        f"eval/{r['steps']}step/{k}": r[k]
        for r in rows
        if r["model"].startswith("student")
        for k in task.metric_names
        if not math.isnan(r[k])
    }
