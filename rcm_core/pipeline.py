"""End-to-end 2-D pipeline used by the CLI: get a teacher, distill, checkpoint, evaluate.

Progress goes through a `reporter(kind, **fields)` callback so the CLI prints lines and the Ray worker
(later) forwards metrics, without this module knowing about either.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rcm_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rcm_core.config import DistillConfig, config_from_dict, config_to_dict
from rcm_core.data.toy2d import Toy2DTask
from rcm_core.distill import Distiller
from rcm_core.eval.toy2d import toy2d_metrics
from rcm_core.models.flow import FlowModel, guided_f
from rcm_core.sampling import sample_consistency, sample_euler, student_times
from rcm_core.teacher import load_toy2d_teacher, save_teacher, train_toy2d_teacher

Reporter = Callable[..., None]


def _quiet(kind: str, **fields) -> None:
    pass


def default_teacher_path(cfg: DistillConfig) -> Path:
    t = cfg.teacher
    name = (
        f"toy2d-{cfg.data.dataset}-h{cfg.model.hidden_dim}x{cfg.model.num_layers}-s{t.train_steps}-seed{cfg.train.seed}"
    )
    return Path(cfg.train.output_dir).parent / "teachers" / f"{name}.safetensors"


def get_teacher(cfg: DistillConfig, reporter: Reporter = _quiet) -> tuple[torch.nn.Module, dict, Path]:
    """Load `teacher.path`, or train the 2-D teacher once and cache it next to the run directory."""
    if cfg.teacher.path:
        path = Path(cfg.teacher.path)
        net, meta = load_toy2d_teacher(path)
        return net, meta, path
    path = default_teacher_path(cfg)
    if path.is_file():
        net, meta = load_toy2d_teacher(path)
        reporter("teacher_cached", path=str(path))
        return net, meta, path
    reporter("teacher_training", steps=cfg.teacher.train_steps, path=str(path))
    net, record = train_toy2d_teacher(
        cfg.data,
        cfg.model,
        cfg.teacher,
        seed=cfg.train.seed,
        progress=lambda s, n, loss: reporter("teacher_progress", step=s, total=n, loss=loss),
    )
    meta = {
        "task": "toy2d",
        "parameterization": "rf",
        "data": dataclasses.asdict(cfg.data),
        "model": dataclasses.asdict(cfg.model),
        "training": {**record, "steps": cfg.teacher.train_steps, "batch_size": cfg.teacher.train_batch_size},
    }
    save_teacher(net, path, meta)
    reporter("teacher_trained", path=str(path), seconds=record["train_seconds"])
    return net, meta, path


def build_distiller(cfg: DistillConfig, teacher_net: torch.nn.Module, meta: dict) -> Distiller:
    task = Toy2DTask(dataclasses.replace(cfg.data, **meta["data"]))
    return Distiller(cfg, teacher_net, task, parameterization=meta["parameterization"])


def distill(cfg: DistillConfig, *, resume: bool = True, reporter: Reporter = _quiet) -> Distiller:
    """Train a student per `cfg`; checkpoints land in output_dir/checkpoints/step-<N>/."""
    torch.manual_seed(cfg.train.seed)
    teacher_net, meta, teacher_path = get_teacher(cfg, reporter)
    distiller = build_distiller(cfg, teacher_net, meta)
    out = Path(cfg.train.output_dir)
    ckpt_root = out / "checkpoints"
    (out).mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"config": config_to_dict(cfg), "teacher": meta}, indent=2) + "\n")
    if resume and (latest := latest_checkpoint(ckpt_root)) is not None:
        load_checkpoint(distiller, latest)
        reporter("resumed", step=distiller.step, path=str(latest))
    extra = {"teacher_path": str(teacher_path)}
    start, first = time.perf_counter(), distiller.step
    while distiller.step < cfg.train.steps:
        metrics = distiller.train_step()
        step = distiller.step
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rate = (step - first) / max(time.perf_counter() - start, 1e-9)
            reporter("step", step=step, total=cfg.train.steps, eta=(cfg.train.steps - step) / rate, **metrics)
        every = cfg.train.checkpoint_every
        if (every and step % every == 0) or step == cfg.train.steps:
            path = save_checkpoint(distiller, ckpt_root, step, extra=extra)
            reporter("checkpoint", step=step, path=str(path))
    return distiller


def load_student(checkpoint_dir: Path) -> tuple[Distiller, DistillConfig, dict]:
    """Rebuild a Distiller from a run's checkpoint directory (config.json sits two levels up)."""
    run_dir = checkpoint_dir.parent.parent
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = config_from_dict(saved["config"])
    meta = saved["teacher"]
    from rcm_core.teacher import build_toy2d_net

    net = build_toy2d_net(cfg.model, Toy2DTask(cfg.data))  # weights come from the checkpoint
    distiller = build_distiller(cfg, net, meta)
    load_checkpoint(distiller, checkpoint_dir)
    return distiller, cfg, meta


@torch.no_grad()
def sample_student(model: FlowModel, task: Toy2DTask, n: int, steps: int, *, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    cond = task.sample_cond(n, generator=gen)
    noise = torch.randn(n, 2, generator=gen)
    return sample_consistency(lambda x, t: model(x, t, cond), noise, student_times(steps), generator=gen)


@torch.no_grad()
def sample_teacher(model: FlowModel, task: Toy2DTask, n: int, steps: int, guidance: float, *, seed: int):
    gen = torch.Generator().manual_seed(seed)
    cond = task.sample_cond(n, generator=gen)
    noise = torch.randn(n, 2, generator=gen)
    null = task.null_cond(n)
    return sample_euler(lambda x, t: guided_f(model, x, t, cond, null, guidance), noise, steps)


def _timed(fn) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def evaluate_rows(
    entries: list[tuple[str, Callable[[int, int], torch.Tensor], list[int]]], task: Toy2DTask, n: int, seed: int
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """entries: (name, sampler(n, steps), step counts) -> table rows and the samples per row."""
    rows, samples = [], {}
    for name, sampler, steps_list in entries:
        for steps in steps_list:
            x, sec = _timed(lambda s=steps, f=sampler: f(n, s))
            rows.append(
                {"model": name, "steps": steps, **toy2d_metrics(x, task, seed=seed), "ms_per_1k": 1e6 * sec / n}
            )
            samples[f"{name} {steps}-step"] = x
    return rows, samples


def teacher_entry(teacher: FlowModel, task: Toy2DTask, guidance: float, steps: list[int], seed: int):
    return ("teacher (Euler)", lambda n, s: sample_teacher(teacher, task, n, s, guidance, seed=seed), steps)


def student_entry(name: str, model: FlowModel, task: Toy2DTask, steps: list[int], seed: int):
    return (name, lambda n, s: sample_student(model, task, n, s, seed=seed), steps)
