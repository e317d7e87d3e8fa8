"""End-to-end pipeline used by the CLI and the Ray worker: get a teacher, distill, checkpoint, evaluate.

Two built-in tasks: the 2-D mixtures (MLP teacher trained here on first use) and shapes (text-to-image; the
teacher ships in rcm_core/assets, trained by `rcm teacher train --preset shapes`).

Progress goes through a `reporter(kind, **fields)` callback so the CLI prints lines and the Ray worker
(later) forwards metrics, without this module knowing about either.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rcm_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rcm_core.config import ConfigError, DistillConfig, config_from_dict, config_to_dict
from rcm_core.data.toy2d import Toy2DTask
from rcm_core.distill import Distiller
from rcm_core.eval.toy2d import toy2d_metrics
from rcm_core.models.flow import FlowModel, guided_f
from rcm_core.sampling import DEFAULT_MID_TIMES, sample_consistency, sample_euler, student_times
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


SHIPPED_SHAPES_TEACHER = Path(__file__).parent / "assets" / "shapes_teacher.safetensors"


def get_teacher(cfg: DistillConfig, reporter: Reporter = _quiet) -> tuple[torch.nn.Module, dict, Path]:
    """Load `teacher.path` (shapes: the shipped teacher by default), or train the 2-D teacher once and cache it."""
    if cfg.task == "shapes":
        from rcm_core.shapes_teacher import load_shapes_teacher

        path = Path(cfg.teacher.path) if cfg.teacher.path else SHIPPED_SHAPES_TEACHER
        net, meta = load_shapes_teacher(path)
        return net, meta, path
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


def training_device(cfg: DistillConfig) -> torch.device:
    """train.device, with auto = CUDA when available for shapes (the 2-D task always runs on the CPU)."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    if cfg.train.device == "auto":
        return torch.device("cuda" if cfg.task == "shapes" and torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def build_task(cfg: DistillConfig, meta: dict, device: torch.device | None = None):
    """The data/condition source of a run: Toy2DTask, ShapesTask, or (GPU, data.pool_size > 0) PooledShapesTask."""
    if meta.get("task") != cfg.task:
        raise ConfigError(f"teacher.path: a {meta.get('task')!r} teacher cannot be distilled on task {cfg.task!r}")
    if cfg.task == "toy2d":
        return Toy2DTask(dataclasses.replace(cfg.data, **meta["data"]))
    from rcm_core.data.shapes import PooledShapesTask, ShapesTask, load_prompt_file

    prompts = load_prompt_file(cfg.data.prompt_file) if cfg.data.prompt_file else None
    if cfg.data.pool_size > 0:
        workers = min(8, os.cpu_count() or 1)
        pool = PooledShapesTask(
            cfg.data.pool_size, seed=cfg.train.seed, device=device or "cpu", workers=workers, prompts=prompts
        )
        return pool
    return ShapesTask(prompts=prompts)


def build_distiller(
    cfg: DistillConfig,
    teacher_net: torch.nn.Module,
    meta: dict,
    *,
    copy_net: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    device: torch.device | None = None,
) -> Distiller:
    """The Distiller for `cfg`; `copy_net` / `device` as for Distiller (sharded networks, GPU generator).

    On CUDA the losses run under bf16 autocast (the time path stays float32).
    """
    task = build_task(cfg, meta, device)
    param = meta["parameterization"]
    amp = device is not None and torch.device(device).type == "cuda"
    return Distiller(cfg, teacher_net, task, parameterization=param, copy_net=copy_net, device=device, autocast=amp)


def distill(cfg: DistillConfig, *, resume: bool = True, reporter: Reporter = _quiet) -> Distiller:
    """Train a student per `cfg`; checkpoints land in output_dir/checkpoints/step-<N>/."""
    torch.manual_seed(cfg.train.seed)
    teacher_net, meta, teacher_path = get_teacher(cfg, reporter)
    device = training_device(cfg)
    if device.type == "cuda":
        teacher_net = teacher_net.to(device)
    distiller = build_distiller(cfg, teacher_net, meta, device=device if device.type == "cuda" else None)
    out = Path(cfg.train.output_dir)
    ckpt_root = out / "checkpoints"
    (out).mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"config": config_to_dict(cfg), "teacher": meta}, indent=2) + "\n")
    if resume and (latest := latest_checkpoint(ckpt_root)) is not None:
        load_checkpoint(distiller, latest)
        reporter("resumed", step=distiller.step, path=str(latest))
    extra = {"teacher_path": str(teacher_path)}
    start, first = time.perf_counter(), distiller.step
    last_log = (start, first)
    while distiller.step < cfg.train.steps:
        metrics = distiller.train_step()
        step = distiller.step
        if cfg.train.max_minutes and time.perf_counter() - start > 60 * cfg.train.max_minutes:
            path = save_checkpoint(distiller, ckpt_root, step, extra=extra)
            reporter("time_limit", step=step, path=str(path))
            break
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            now = time.perf_counter()
            rate = (step - first) / max(now - start, 1e-9)
            # wall time since the last line (reading the metrics waits for the device, so this includes GPU time)
            wall = (now - last_log[0]) / max(step - last_log[1], 1)
            last_log = (now, step)
            reporter(
                "step",
                step=step,
                total=cfg.train.steps,
                eta=(cfg.train.steps - step) / rate,
                wall_seconds_per_step=wall,
                **metrics,
            )
        every = cfg.train.checkpoint_every
        if (every and step % every == 0) or step == cfg.train.steps:
            path = save_checkpoint(distiller, ckpt_root, step, extra=extra)
            reporter("checkpoint", step=step, path=str(path))
    return distiller


def load_student(checkpoint_dir: Path) -> tuple[Distiller, DistillConfig, dict]:
    """Rebuild a Distiller from a run's checkpoint directory (config.json sits two levels up), for evaluation.

    The student, EMA and fake score come from the checkpoint; the frozen teacher (not in checkpoints) is loaded
    from the teacher file recorded in the checkpoint's manifest, else from the config's teacher path.
    """
    run_dir = checkpoint_dir.parent.parent
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = config_from_dict(saved["config"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pool_size=0))  # evaluation draws no data
    manifest_path = checkpoint_dir / "manifest.json"
    recorded = json.loads(manifest_path.read_text()).get("teacher_path") if manifest_path.is_file() else None
    if recorded and Path(recorded).is_file():
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, path=recorded))
    elif cfg.task == "toy2d" and not cfg.teacher.path:
        cached = default_teacher_path(cfg)
        if not cached.is_file():
            raise ConfigError(
                f"{checkpoint_dir}: its teacher ({recorded or cached}) is gone; cannot evaluate against it"
            )
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, path=str(cached)))
    teacher_net, meta, _ = get_teacher(cfg)
    distiller = build_distiller(cfg, teacher_net, meta)
    distiller.restore_rng = False  # for evaluation: the student may have been trained on another device
    load_checkpoint(distiller, checkpoint_dir)
    return distiller, cfg, meta


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


def student_entry(
    name: str, model: FlowModel, task: Toy2DTask, steps: list[int], seed: int, mid_times=DEFAULT_MID_TIMES
):
    return (name, lambda n, s: sample_student(model, task, n, s, seed=seed, mid_times=mid_times), steps)
