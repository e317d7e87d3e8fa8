"""The local (single-process) wiring of a distillation run, used by the `rcm` CLI and the benchmarks: get the
teacher, build the Distiller, run the Trainer with checkpoints under output_dir, reload a student to evaluate.

What a task needs (teacher, data, evaluation) comes from the task registry (rcm_core.tasks); the loop is
rcm_core.trainer. Progress goes through a `reporter(kind, **fields)` callback so the CLI prints lines without
this module knowing how.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rcm_core.checkpoint import DirectoryStore, load_checkpoint
from rcm_core.config import ConfigError, DistillConfig, config_from_dict, config_to_dict
from rcm_core.distill import Distiller
from rcm_core.tasks import get_task
from rcm_core.teacher import save_teacher
from rcm_core.trainer import Trainer, TrainHooks

Reporter = Callable[..., None]


def _quiet(kind: str, **fields) -> None:
    pass


def teacher_cache_dir(cfg: DistillConfig) -> Path:
    """Built-in teachers trained by local runs, named by their content key, next to the run directories."""
    return Path(cfg.train.output_dir).parent / "teachers"


def get_teacher(cfg: DistillConfig, reporter: Reporter = _quiet) -> tuple[torch.nn.Module, dict, Path | None]:
    """`teacher.path`, else the task's built-in teacher (trained once per config and cached by content key).

    Returns:
        (network, metadata, the file it came from; None for a teacher that ships inside the package)
    """
    task = get_task(cfg.task)
    if cfg.teacher.path:
        path = Path(cfg.teacher.path)
        net, meta = task.load_teacher(path)
        return net, meta, path
    key = task.teacher_cache_key(cfg)
    if key is None:
        net, meta = task.builtin_teacher(cfg)
        return net, meta, None
    path = teacher_cache_dir(cfg) / f"{key}.safetensors"
    if path.is_file():
        net, meta = task.load_teacher(path)
        reporter("teacher_cached", path=str(path))
        return net, meta, path
    reporter("teacher_training", steps=cfg.teacher.train_steps, path=str(path))
    net, meta = task.builtin_teacher(
        cfg, progress=lambda s, n, loss: reporter("teacher_progress", step=s, total=n, loss=loss)
    )
    save_teacher(net, path, meta)
    reporter("teacher_trained", path=str(path), seconds=meta["training"]["train_seconds"])
    return net, meta, path


def training_device(cfg: DistillConfig) -> torch.device:
    """train.device, with auto = CUDA when available for tasks that use it (the 2-D task runs on the CPU)."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    if cfg.train.device == "auto":
        return torch.device("cuda" if get_task(cfg.task).uses_cuda and torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def build_distiller(
    cfg: DistillConfig,
    teacher_net: torch.nn.Module,
    meta: dict,
    *,
    copy_net: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    device: torch.device | None = None,
    access=None,
) -> Distiller:
    """The Distiller for `cfg`; `copy_net` / `device` as for Distiller (sharded networks, GPU generator);
    `access` as for Task.build_data (a stored dataset's filesystem and this rank's share).

    On CUDA the losses run under bf16 autocast (the time path stays float32).
    """
    if meta.get("task", "toy2d") != cfg.task:
        raise ConfigError(f"teacher.path: a {meta.get('task')!r} teacher cannot be distilled on task {cfg.task!r}")
    if cfg.student.lora is not None:  # the targets must be block linears of the teacher's family
        from rcm_core.teachers import FAMILIES
        from rcm_core.teachers.lora import check_targets

        check_targets(cfg.student.lora, FAMILIES[meta["family"]])
    data = get_task(cfg.task).build_data(cfg, meta, device, access)
    param = meta["parameterization"]
    amp = device is not None and torch.device(device).type == "cuda"
    distiller = Distiller(
        cfg, teacher_net, data, parameterization=param, copy_net=copy_net, device=device, autocast=amp
    )
    get_task(cfg.task).prepare_data(data, distiller.teacher)  # e.g. samples drawn by the teacher, on every rank
    return distiller


class _ReportingStore(DirectoryStore):
    def __init__(self, root: Path, reporter: Reporter, *, resume: bool, extra: dict[str, Any]):
        super().__init__(root, resume=resume)
        self.reporter, self.extra = reporter, extra

    def restore(self, app):
        manifest = super().restore(app)
        if manifest is not None:
            self.reporter("resumed", step=int(manifest["step"]), path=str(self.restored))
        return manifest

    def save(self, app, extra, metrics) -> None:
        super().save(app, {**extra, **self.extra}, metrics)
        self.reporter("checkpoint", step=int(metrics["step"]), path=str(self.last_saved))


def distill(cfg: DistillConfig, *, resume: bool = True, reporter: Reporter = _quiet) -> Distiller:
    """Train a student per `cfg`; checkpoints land in output_dir/checkpoints/step-<N>/."""
    torch.manual_seed(cfg.train.seed)
    teacher_net, meta, teacher_path = get_teacher(cfg, reporter)
    device = training_device(cfg)
    if device.type == "cuda":
        teacher_net = teacher_net.to(device)
    distiller = build_distiller(cfg, teacher_net, meta, device=device if device.type == "cuda" else None)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"config": config_to_dict(cfg), "teacher": meta}, indent=2) + "\n")
    extra = {"teacher_path": str(teacher_path) if teacher_path else None}
    store = _ReportingStore(out / "checkpoints", reporter, resume=resume, extra=extra)
    # each `rcm distill` is a sitting with its own time budget (scripts/gpu/shapes_sweep.sh trains in sittings)
    hooks = TrainHooks(log=lambda step, m: reporter("step", **m))
    trainer = Trainer(distiller, store, hooks, budget_spans_resumes=False)
    trainer.resume()
    result = trainer.run()
    if result.status == "time_limit":
        reporter("time_limit", step=result.step)
    return distiller


def load_student(checkpoint_dir: Path) -> tuple[Distiller, DistillConfig, dict]:
    """Rebuild a Distiller from a run's checkpoint directory (config.json sits two levels up), for evaluation.

    The student, EMA and fake score come from the checkpoint; the frozen teacher (not in checkpoints) is loaded
    from the teacher file recorded in the checkpoint's manifest, else the config's teacher (the built-in one).
    """
    run_dir = checkpoint_dir.parent.parent
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = config_from_dict(saved["config"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pool_size=0))  # evaluation draws no data
    manifest_path = checkpoint_dir / "manifest.json"
    recorded = json.loads(manifest_path.read_text()).get("teacher_path") if manifest_path.is_file() else None
    task = get_task(cfg.task)
    if recorded and Path(recorded).is_file():
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, path=recorded))
    elif not cfg.teacher.path and (key := task.teacher_cache_key(cfg)) is not None:
        cached = teacher_cache_dir(cfg) / f"{key}.safetensors"
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
