"""`train_loop_per_worker`: the rCM loop on one Ray Train worker.

Checkpoints: every rank saves its DCP shard into a temp dir (manifest.json written last) and calls
`ray.train.report(metrics, checkpoint=...)`; Ray persists it to S3 under ray/<job id>/ and hands the
latest back through `ray.train.get_checkpoint()` after a worker failure. Rank 0 logs to MLflow.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import torch

from rcm_core import pipeline
from rcm_core.checkpoint import load_checkpoint, save_checkpoint
from workers import storage
from workers.spec import distill_config_from_spec
from workers.tracking import RunLogger


def _resume(distiller) -> int:
    """Load the latest Ray Train checkpoint if any; returns the recovery count carried in its manifest."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        manifest = load_checkpoint(distiller, Path(d))
    return int(manifest.get("recovery_count", 0)) + 1


def _report_checkpoint(distiller, metrics: dict[str, float], recovery_count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(distiller, Path(tmp), distiller.step, extra={"recovery_count": recovery_count})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    job_id, spec = config["job_id"], config["spec"]
    workdir = Path(tempfile.mkdtemp(prefix=f"rcm-{job_id[:8]}-"))
    teacher_path = storage.download(config["teacher_uri"], workdir / "teacher.safetensors")
    cfg = distill_config_from_spec(spec, output_dir=str(workdir / "run"), teacher_path=str(teacher_path))
    torch.manual_seed(cfg.train.seed)
    teacher_net, meta, _ = pipeline.get_teacher(cfg)
    distiller = pipeline.build_distiller(cfg, teacher_net, meta)
    recovery_count = _resume(distiller)
    rank0 = ray.train.get_context().get_world_rank() == 0
    log = RunLogger(os.environ.get("RCM_MLFLOW_RUN_ID") if rank0 else None)
    if distiller.step == 0:
        log.params({"job_id": job_id, **_flatten(spec)})
    log.metrics({"recovery_count": recovery_count, "step": distiller.step}, step=distiller.step)

    start, first = time.perf_counter(), distiller.step
    while distiller.step < cfg.train.steps:
        metrics = distiller.train_step()
        step = distiller.step
        cancel = False
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rate = (step - first) / max(time.perf_counter() - start, 1e-9)
            log.metrics({**metrics, **_system_metrics(), "step": step, "steps_per_second": rate}, step=step)
            cancel = storage.cancel_requested(job_id)
        if rank0 and step % spec["schedule"]["eval_every"] == 0 and step < cfg.train.steps:
            _evaluate(distiller, cfg, log, workdir)
        if cancel or step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            _report_checkpoint(distiller, {"step": step, "loss": metrics["loss"]}, recovery_count)
        if cancel:
            log.metrics({"cancelled": 1.0}, step=step)
            return
    if rank0:
        _export(distiller, cfg, job_id, log)


def _system_metrics() -> dict[str, float]:
    import psutil

    proc = psutil.Process()
    out = {"system/cpu_percent": psutil.cpu_percent(), "system/rss_mb": proc.memory_info().rss / 2**20}
    if torch.cuda.is_available():
        out["system/gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _evaluate(distiller, cfg, log: RunLogger, workdir: Path) -> None:
    """Periodic evaluation of the EMA student: metrics at 1 and 4 steps, and a sample grid."""
    from rcm_core.eval.toy2d import scatter_grid

    entries = [pipeline.student_entry("student (EMA)", distiller.ema.model, distiller.task, [1, 4], 0)]
    rows, samples = pipeline.evaluate_rows(entries, distiller.task, 1000, 0)
    step = distiller.step
    log.metrics(
        {f"eval/{r['steps']}step/{k}": r[k] for r in rows for k in ("mode_coverage", "precision", "sliced_w2")},
        step=step,
    )
    grid = scatter_grid(list(samples.items()), workdir / "samples" / f"step-{step:07d}.png", columns=2)
    log.artifact(grid, "samples")


def _export(distiller, cfg, job_id: str, log: RunLogger) -> None:
    """Student (EMA) weights + config + evaluation report + sample grid, to S3 and MLflow."""
    from safetensors.torch import save_file

    from rcm_core.eval.toy2d import scatter_grid

    out = Path(cfg.train.output_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in distiller.ema.model.net.state_dict().items()}
    save_file(state, str(out / "student.safetensors"))
    (out / "config.json").write_text(
        json.dumps(
            {
                "parameterization": distiller.student.parameterization,
                "model": cfg.model.__dict__,
                "data": cfg.data.__dict__,
            },
            indent=2,
        )
    )
    entries = [
        pipeline.teacher_entry(distiller.teacher, distiller.task, cfg.teacher.guidance_scale, [1, 4, 32], 0),
        pipeline.student_entry("student (EMA)", distiller.ema.model, distiller.task, [1, 2, 4], 0),
    ]
    rows, samples = pipeline.evaluate_rows(entries, distiller.task, 2000, 0)
    (out / "report.json").write_text(json.dumps({"rows": rows, "step": distiller.step}, indent=2))
    scatter_grid(list(samples.items()), out / "samples.png")
    bucket = os.environ["RCM_CHECKPOINT_BUCKET"]
    for f in out.iterdir():
        storage.upload(f, f"s3://{bucket}/jobs/{job_id}/export/{f.name}")
    for r in rows:
        if r["model"].startswith("student"):
            log.metrics(
                {f"eval/{r['steps']}step/{k}": r[k] for k in ("mode_coverage", "precision", "sliced_w2")},
                step=distiller.step,
            )
    log.artifacts(out)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
