"""`train_loop_per_worker`: the rCM loop on one Ray Train worker (rank) of N.

Checkpoints (workers/checkpointing.py): every rank saves its DCP shard into a temp dir and calls
`ray.train.report(metrics, checkpoint=...)`; Ray merges the shards into one checkpoint under ray/<job id>/ on S3,
rank 0 writes its manifest.json once every shard is there, and a restarted worker resumes from the newest
checkpoint with a complete manifest. With N workers the
networks are sharded (workers/distributed.py) and every collective is entered by all ranks in the same order:
rank 0 alone reads the cancel marker and broadcasts its answer, and logs to MLflow, evaluates and exports from
unsharded copies gathered from all ranks.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcm_core import pipeline
from rcm_core.checkpoint import load_checkpoint
from rcm_core.distill import Distiller
from rcm_core.eval import report_json
from rcm_core.models.flow import FlowModel
from workers import checkpointing, distributed, evaluation, storage
from workers.entrypoint import BUILTIN_SHAPES
from workers.spec import distill_config_from_spec, parallel_config_from_spec
from workers.tracking import RunLogger


def _resume(distiller, job_id: str) -> tuple[int, float]:
    """Load the job's newest complete checkpoint if any (workers/checkpointing.py: manifest written last).

    Returns:
        (recovery count, training seconds spent before that checkpoint), both carried in its manifest.
    """
    with checkpointing.restore_latest(job_id) as d:
        if d is None:
            return 0, 0.0
        manifest = load_checkpoint(distiller, d)
    return int(manifest.get("recovery_count", 0)) + 1, float(manifest.get("train_seconds", 0.0))


def _report_checkpoint(
    distiller, metrics: dict[str, float], recovery_count: int, train_seconds: float, job_id: str
) -> None:
    extra = {"recovery_count": recovery_count, "train_seconds": train_seconds}
    checkpointing.report_checkpoint(distiller, metrics, job_id=job_id, step=distiller.step, extra=extra)


def _build(config: dict[str, Any], workdir: Path) -> tuple[Any, nn.Module, dict, Distiller, torch.device]:
    """Fetch the teacher (and prompt file), build the config and the Distiller, sharded over the workers.

    builtin:shapes is the teacher shipped inside rcm_core (teacher.path None loads it; workers/entrypoint.py).

    Returns:
        (DistillConfig, the unsharded teacher network, its metadata, Distiller, this rank's device)
    """
    spec, teacher_uri = config["spec"], config["teacher_uri"]
    teacher_path = None
    if teacher_uri != BUILTIN_SHAPES:
        teacher_path = str(storage.download(teacher_uri, workdir / "teacher.safetensors"))
    prompt_uri = spec["data"].get("prompt_file_uri")
    prompt_file = storage.fetch_prompt_file(prompt_uri, workdir / "prompts.txt") if prompt_uri else None
    cfg = distill_config_from_spec(
        spec,
        output_dir=str(workdir / "run"),
        teacher_path=teacher_path,
        prompt_file=None if prompt_file is None else str(prompt_file),
    )
    pconfig = parallel_config_from_spec(spec)
    device = distributed.training_device(spec["resources"]["use_gpu"])
    torch.manual_seed(cfg.train.seed)
    teacher_net, meta, _ = pipeline.get_teacher(cfg)
    dims = distributed.build_parallel_dims(pconfig, device)
    copy_net = distributed.net_copy_fn(teacher_net, dims=dims, config=pconfig, device=device)
    if copy_net is None:  # one worker: the networks themselves live on the device (sharded copies move there)
        teacher_net = teacher_net.to(device)
    distiller = pipeline.build_distiller(cfg, teacher_net, meta, copy_net=copy_net, device=device)
    return cfg, teacher_net, meta, distiller, device


def train_loop_per_worker(config: dict[str, Any]) -> None:
    job_id, spec = config["job_id"], config["spec"]
    workdir = Path(tempfile.mkdtemp(prefix=f"rcm-{job_id[:8]}-"))
    cfg, teacher_net, meta, distiller, device = _build(config, workdir)
    recovery_count, trained_before = _resume(distiller, job_id)
    rank0 = distributed.rank() == 0
    log = RunLogger(os.environ.get("RCM_MLFLOW_RUN_ID") if rank0 else None)
    if distiller.step == 0:
        log.params({"job_id": job_id, **_flatten(spec)})
    log.metrics({"recovery_count": recovery_count, "step": distiller.step}, step=distiller.step)
    # schedule.max_minutes: a training-time budget across recoveries (time spent before a failure counts up to
    # its last checkpoint); checked at log steps, then the job checkpoints and exports as if it had finished.
    # "Training time" is the loop's wall-clock: periodic evaluations and checkpoint uploads count too.
    budget = 60 * cfg.train.max_minutes
    # a recovery after the budget was spent (e.g. a crash during the export) goes straight to the export
    spent_already = bool(budget) and distributed.rank0_decides(rank0 and trained_before >= budget, device)

    start, first = time.perf_counter(), distiller.step
    while distiller.step < cfg.train.steps and not spent_already:
        metrics = distiller.train_step()
        step = distiller.step
        cancel = out_of_time = False
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rate = (step - first) / max(time.perf_counter() - start, 1e-9)
            if rank0:
                log.metrics({**metrics, **_system_metrics(), "step": step, "steps_per_second": rate}, step=step)
            # every rank must leave the loop at the same step: rank 0 reads the marker, the others follow it
            cancel = distributed.rank0_decides(rank0 and storage.cancel_requested(job_id), device)
            if budget and not cancel:
                spent = trained_before + time.perf_counter() - start
                out_of_time = distributed.rank0_decides(rank0 and spent >= budget, device)
        if step % spec["schedule"]["eval_every"] == 0 and step < cfg.train.steps and not out_of_time:
            _evaluate(distiller, teacher_net, cfg, log, workdir)
        if cancel or out_of_time or step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            spent = trained_before + time.perf_counter() - start
            _report_checkpoint(distiller, {"step": step, "loss": metrics["loss"]}, recovery_count, spent, job_id)
        if cancel:
            log.metrics({"cancelled": 1.0}, step=step)
            return
        if out_of_time:
            log.metrics({"time_limit_reached": 1.0}, step=step)
            break
    _export(distiller, teacher_net, meta, cfg, job_id, log)


def _system_metrics() -> dict[str, float]:
    import psutil

    proc = psutil.Process()
    out = {"system/cpu_percent": psutil.cpu_percent(), "system/rss_mb": proc.memory_info().rss / 2**20}
    if torch.cuda.is_available():
        out["system/gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _ema_student(distiller: Distiller, teacher_net: nn.Module) -> FlowModel | None:
    """The EMA student, unsharded, on rank 0 (None elsewhere); all ranks must call it."""
    net = distributed.full_copy(distiller.ema.model.net, teacher_net)
    return None if net is None else FlowModel(net, distiller.student.parameterization).eval()


def _evaluate(distiller: Distiller, teacher_net: nn.Module, cfg, log: RunLogger, workdir: Path) -> None:
    """Periodic evaluation of the EMA student on rank 0: metrics at 1 and 4 steps, and a sample grid."""
    ema = _ema_student(distiller, teacher_net)
    if ema is None:
        return
    step = distiller.step
    grid = workdir / "samples" / f"step-{step:07d}.png"
    log.metrics(evaluation.periodic(cfg, ema, distiller.task, grid), step=step)
    log.artifact(grid, "samples")


def _export(distiller: Distiller, teacher_net: nn.Module, meta: dict, cfg, job_id: str, log: RunLogger) -> None:
    """Rank 0: student (EMA) weights + config + evaluation report + sample grid, to S3 and MLflow."""
    from safetensors.torch import save_file

    ema = _ema_student(distiller, teacher_net)
    if ema is None:
        return
    out = Path(cfg.train.output_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ema.net.state_dict().items()}
    save_file(state, str(out / "student.safetensors"))
    network = meta["config"] if cfg.task == "shapes" else cfg.model.__dict__  # what rebuilds the student's network
    (out / "config.json").write_text(
        json.dumps(
            {
                "task": cfg.task,
                "parameterization": distiller.student.parameterization,
                "model": network,
                "data": cfg.data.__dict__,
                "guidance_scale": cfg.teacher.guidance_scale,
            },
            indent=2,
        )
    )
    teacher = FlowModel(teacher_net, distiller.teacher.parameterization).eval()
    rows, metrics = evaluation.final_report(cfg, teacher, ema, distiller.task, meta, out)
    (out / "report.json").write_text(report_json({"rows": rows, "step": distiller.step}))
    bucket = os.environ["RCM_CHECKPOINT_BUCKET"]
    for f in out.iterdir():
        storage.upload(f, f"s3://{bucket}/jobs/{job_id}/export/{f.name}")
    log.metrics(metrics, step=distiller.step)
    log.artifacts(out)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
