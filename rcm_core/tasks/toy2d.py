"""The 2-D task: mixtures of Gaussians (ring8, grid25) with a class label, an MLP flow teacher trained here.

Metrics: mode coverage, precision and sliced W2 (rcm_core.eval.toy2d); the grid is a scatter plot per row.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rcm_core.config import DistillConfig, toy2d_rcm
from rcm_core.data.toy2d import Toy2DTask
from rcm_core.models.flow import FlowModel, guided_f
from rcm_core.sampling import DEFAULT_MID_TIMES, sample_consistency, sample_euler, student_times
from rcm_core.tasks.base import Task, content_key, register
from rcm_core.teacher import load_toy2d_teacher, train_toy2d_teacher

TEACHER_SEED = 0  # the built-in teacher is one per config, shared by every job whatever its own seed


@register
class Toy2D(Task):
    name = "toy2d"
    datasets = ("ring8", "grid25")
    metric_names = ("mode_coverage", "precision", "sliced_w2")

    def preset(self, family: str | None = None) -> DistillConfig:
        return toy2d_rcm()

    def teacher_cache_key(self, cfg: DistillConfig) -> str:
        t = cfg.teacher
        training = {k: getattr(t, k) for k in ("train_steps", "train_batch_size", "train_lr", "label_dropout")}
        payload = {
            "task": self.name,
            "data": {"dataset": cfg.data.dataset, "mode_std": cfg.data.mode_std},
            "model": dataclasses.asdict(cfg.model),
            "training": training,
            "seed": TEACHER_SEED,
        }
        return f"toy2d-{cfg.data.dataset}-{content_key(payload)}"

    def builtin_teacher(self, cfg: DistillConfig, progress: Callable | None = None) -> tuple[torch.nn.Module, dict]:
        data = dataclasses.replace(cfg.data, prompt_file=None, pool_size=0)
        net, record = train_toy2d_teacher(data, cfg.model, cfg.teacher, seed=TEACHER_SEED, progress=progress)
        meta = {
            "task": self.name,
            "parameterization": "rf",
            "data": dataclasses.asdict(data),
            "model": dataclasses.asdict(cfg.model),
            "training": {**record, "steps": cfg.teacher.train_steps, "batch_size": cfg.teacher.train_batch_size},
            "cache_key": self.teacher_cache_key(cfg),
        }
        return net, meta

    def load_teacher(self, path: Path) -> tuple[torch.nn.Module, dict]:
        return load_toy2d_teacher(path)

    def build_data(self, cfg: DistillConfig, meta: dict, device: torch.device | None, access=None) -> Toy2DTask:
        return Toy2DTask(dataclasses.replace(cfg.data, **meta["data"]))  # the teacher's mixture

    def evaluate(self, cfg, entries, data, *, num_samples, seed, grid) -> list[dict[str, Any]]:
        from rcm_core.eval.toy2d import scatter_grid, toy2d_metrics

        rows, panels = [], []
        for name, model, steps_list, is_teacher in entries:
            for steps in steps_list:
                start = time.perf_counter()
                if is_teacher:
                    x = sample_teacher(model, data, num_samples, steps, cfg.teacher.guidance_scale, seed=seed)
                else:
                    mid = cfg.eval.student_mid_times
                    x = sample_student(model, data, num_samples, steps, seed=seed, mid_times=mid)
                ms = 1e6 * (time.perf_counter() - start) / num_samples
                rows.append({"model": name, "steps": steps, **toy2d_metrics(x, data, seed=seed), "ms_per_1k": ms})
                panels.append((f"{name} {steps}-step", x))
        scatter_grid(panels, grid, columns=min(4, len(panels)))
        return rows

    def network_config(self, cfg: DistillConfig, meta: dict) -> dict[str, Any]:
        return dataclasses.asdict(cfg.model)

    def format_table(self, rows: list[dict]) -> str:
        from rcm_core.eval.toy2d import format_table

        return format_table(rows)


@torch.no_grad()
def sample_student(
    model: FlowModel, task: Toy2DTask, n: int, steps: int, *, seed: int, mid_times=DEFAULT_MID_TIMES
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cond = task.sample_cond(n, generator=gen)
    noise = torch.randn(n, 2, generator=gen)
    times = student_times(steps, mid_times)
    return sample_consistency(lambda x, t: model(x, t, cond), noise, times, generator=gen)


@torch.no_grad()
def sample_teacher(model: FlowModel, task: Toy2DTask, n: int, steps: int, guidance: float, *, seed: int):
    gen = torch.Generator().manual_seed(seed)
    cond = task.sample_cond(n, generator=gen)
    noise = torch.randn(n, 2, generator=gen)
    null = task.null_cond(n)
    return sample_euler(lambda x, t: guided_f(model, x, t, cond, null, guidance), noise, steps)
