"""`train_loop_per_worker`: one Ray Train worker (rank) of N runs rcm_core's Trainer; this file is the Ray wiring.

Checkpoints (workers/checkpointing.py): every rank saves its DCP shard into a temp dir and calls
`ray.train.report(metrics, checkpoint=...)`; Ray merges the shards into one checkpoint under ray/<job id>/ on S3,
rank 0 writes its manifest.json once every shard is there, and a restarted worker resumes from the newest
checkpoint with a complete manifest. With N workers the
networks are sharded (workers/distributed.py) and every collective is entered by all ranks in the same order:
rank 0 alone reads the cancel marker and broadcasts its answer, and logs to MLflow, evaluates and exports from
unsharded copies gathered from all ranks. A non-finite step ends the job (no retry: it would recur) with a
reason naming the step and the terms, written for workers/entrypoint.py to report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcm_core import pipeline
from rcm_core.checkpoint import load_checkpoint
from rcm_core.distill import Distiller
from rcm_core.eval import report_json
from rcm_core.export import MANIFEST, config_sha256, export_manifest
from rcm_core.models.flow import FlowModel
from rcm_core.tasks import final_report, get_task, periodic_metrics, student_info
from rcm_core.trainer import NonFiniteError, Trainer, TrainHooks, check_finite_state
from workers import checkpointing, datasets, distributed, storage
from workers.spec import JobConfig, effective_spec, job_config
from workers.tracking import RunLogger


class RayCheckpoints:
    """The Trainer's CheckpointStore over Ray Train and S3 (workers/checkpointing.py): save reports every rank's
    shard and publishes the manifest once all are on S3; restore loads the newest checkpoint with a complete
    manifest (not `ray.train.get_checkpoint()`, which may be one whose shards never all arrived)."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def restore(self, app: Distiller) -> dict[str, Any] | None:
        with checkpointing.restore_latest(self.job_id) as d:
            return None if d is None else load_checkpoint(app, d)

    def save(self, app: Distiller, extra: dict[str, Any], metrics: dict[str, float]) -> None:
        checkpointing.report_checkpoint(app, metrics, job_id=self.job_id, step=int(metrics["step"]), extra=extra)


def _build(job: JobConfig) -> tuple[nn.Module, dict, Distiller, torch.device]:
    """Load the teacher and build the Distiller, sharded over the workers.

    Returns:
        (the unsharded teacher network, its metadata, Distiller, this rank's device)
    """
    device = distributed.training_device(job.use_gpu)
    torch.manual_seed(job.distill.train.seed)
    teacher_net, meta, _ = pipeline.get_teacher(job.distill)  # teacher.path: the downloaded file, or built-in
    dims = distributed.build_parallel_dims(job.parallel, device)
    copy_net = distributed.net_copy_fn(teacher_net, dims=dims, config=job.parallel, device=device)
    if copy_net is None:  # one worker: the networks themselves live on the device (sharded copies move there)
        teacher_net = teacher_net.to(device)
    access = datasets.data_access(job, dims, device)  # a stored dataset: this rank's share of it
    distiller = pipeline.build_distiller(
        job.distill, teacher_net, meta, copy_net=copy_net, device=device, access=access
    )
    return teacher_net, meta, distiller, device


def _fetch_inputs(config: dict[str, Any], workdir: Path) -> JobConfig:
    """The job spec, converted once, with local copies of its teacher (unless built in) and prompt file."""
    job = job_config(config["spec"], output_dir=str(workdir / "run"), teacher_family=config.get("teacher_family"))
    teacher_uri = config["teacher_uri"]  # resolved by the entrypoint (a cached built-in teacher is an s3:// URI)
    teacher_path = None
    if get_task(job.distill.task).teacher_is_directory:  # a diffusers folder (config.json + safetensors shards)
        teacher_path = str(storage.download_prefix(teacher_uri, workdir / "teacher"))
    elif teacher_uri.startswith("s3://"):
        teacher_path = str(storage.download(teacher_uri, workdir / "teacher.safetensors"))
    prompt_file = None
    if job.prompt_file_uri:
        prompt_file = str(storage.fetch_prompt_file(job.prompt_file_uri, workdir / "prompts.txt"))
    cfg = job.distill
    cfg = dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(cfg.teacher, path=teacher_path),
        data=dataclasses.replace(cfg.data, prompt_file=prompt_file),
    )
    return datasets.with_dataset_shapes(dataclasses.replace(job, distill=cfg, teacher_uri=teacher_uri))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    job_id = config["job_id"]
    workdir = Path(tempfile.mkdtemp(prefix=f"rcm-{job_id[:8]}-"))
    job = _fetch_inputs(config, workdir)
    teacher_net, meta, distiller, device = _build(job)
    rank0 = distributed.rank() == 0
    log = RunLogger(os.environ.get("RCM_MLFLOW_RUN_ID") if rank0 else None)
    hooks = TrainHooks(
        log=lambda step, m: log.metrics({**m, **_system_metrics()}, step=step) if rank0 else None,
        evaluate=lambda step: _evaluate(distiller, teacher_net, job, log, workdir),
        cancel_requested=lambda: rank0 and storage.cancel_requested(job_id),
        agree=lambda flag: distributed.rank0_decides(flag, device),
    )
    trainer = Trainer(distiller, RayCheckpoints(job_id), hooks)
    trainer.resume()
    if distiller.step == 0:
        params = {"job_id": job_id, "teacher_source": config.get("teacher_source", "uri")}
        log.params(params | _flatten(effective_spec(job)))
    log.metrics({"recovery_count": trainer.recovery_count, "step": distiller.step}, step=distiller.step)
    try:
        result = trainer.run()
    except NonFiniteError as exc:
        if rank0:  # every rank raised at the same step; one writes the reason, none writes a checkpoint
            storage.write_failure(job_id, str(exc))
            log.metrics({"non_finite": 1.0}, step=exc.step)
        return
    if result.status == "cancelled":
        log.metrics({"cancelled": 1.0}, step=result.step)
        return
    if result.status == "time_limit":
        log.metrics({"time_limit_reached": 1.0}, step=result.step)
    _export(distiller, teacher_net, meta, job, job_id, log)


def _system_metrics() -> dict[str, float]:
    import psutil

    proc = psutil.Process()
    out = {"system/cpu_percent": psutil.cpu_percent(), "system/rss_mb": proc.memory_info().rss / 2**20}
    if torch.cuda.is_available():
        out["system/gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _ema_student(distiller: Distiller, teacher_net: nn.Module) -> FlowModel | None:
    """The EMA student, unsharded, on rank 0 (None elsewhere); all ranks must call it. A LoRA student's copy is
    built from its template (the teacher's weights + adapters), not from the teacher."""
    net = distributed.full_copy(distiller.ema.model.net, distiller.student_template)
    return None if net is None else FlowModel(net, distiller.student.parameterization).eval()


def _evaluate(distiller: Distiller, teacher_net: nn.Module, job: JobConfig, log: RunLogger, workdir: Path) -> None:
    """Periodic evaluation of the EMA student on rank 0: metrics at 1 and 4 steps, and a sample grid."""
    ema = _ema_student(distiller, teacher_net)
    if ema is None:
        return
    step = distiller.step
    grid = workdir / "samples" / f"step-{step:07d}.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    log.metrics(periodic_metrics(job.distill, ema, distiller.task, grid), step=step)
    log.artifact(grid, "samples")


def _export(distiller: Distiller, teacher_net: nn.Module, meta: dict, job: JobConfig, job_id: str, log) -> None:
    """Rank 0: the final report (teacher vs EMA student), then the student in the task's layout (a diffusers task:
    save_pretrained folder, sampler record, model card; rcm_core.export) with the report, grid and evaluation
    latents, uploaded to S3 (jobs/<id>/export/) with its manifest LAST, logged to MLflow, and registered as a
    new version of export.registered_model_name when the spec names one."""
    ema = _ema_student(distiller, teacher_net)
    if ema is None:
        return
    cfg = job.distill
    task = get_task(cfg.task)
    out = Path(cfg.train.output_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ema.net.state_dict().items()}
    check_finite_state(state, "student")  # the Trainer's guard makes this unreachable; an export must never hold NaN
    teacher = FlowModel(teacher_net, distiller.teacher.parameterization).eval()
    rows, metrics = final_report(cfg, teacher, ema, distiller.task, meta, out / "samples.png")
    (out / "report.json").write_text(report_json({"rows": rows, "step": distiller.step}))
    info = student_info(cfg, distiller.student.parameterization, meta)
    info |= {
        "job_id": job_id,
        "teacher": _teacher_identity(job),
        "dataset": _dataset_identity(job),
        "metrics": metrics,
        "step": distiller.step,
        "spec": effective_spec(job),
        "max_shard_size": job.max_shard_size,
        "dtype": job.export_dtype,
    }
    task.write_student(out, state, info, meta)
    key = f"jobs/{job_id}/export/"
    prefix = f"s3://{os.environ['RCM_CHECKPOINT_BUCKET']}/{key}"
    manifest = export_manifest(out, job_id=job_id, step=distiller.step)
    for name in manifest["files"]:
        storage.upload(out / name, prefix + name)
    # the manifest last: a reader (rcm sample, the registry's users) trusts the folder only once it is there
    storage.put_json(manifest, key + MANIFEST)
    log.metrics(metrics, step=distiller.step)
    log.artifacts(out)
    if job.registered_model_name:
        tags = {
            "rcm.job_id": job_id,
            "rcm.teacher": str(info["teacher"].get("uri")),
            "rcm.teacher_config_sha256": str(info["teacher"].get("config_sha256", "")),
            "rcm.dataset": json.dumps(info["dataset"], sort_keys=True),
            "rcm.step": str(distiller.step),
        }
        if info.get("lora"):  # the version is a LoRA of rcm.teacher, not a full transformer
            tags["rcm.lora"] = json.dumps(info["lora"], sort_keys=True)
        log.register_model(job.registered_model_name, prefix, tags)


def _dataset_identity(job: JobConfig) -> dict[str, Any]:
    """The data a student was distilled on, for its lineage: the dataset name and any URI the spec gave for it."""
    data = job.distill.data
    identity: dict[str, Any] = {"dataset": data.dataset}
    for name in ("uri", "prompt_file_uri"):  # a stored dataset (data.uri), a prompt file
        value = getattr(data, name, None) or (job.prompt_file_uri if name == "prompt_file_uri" else None)
        if value:
            identity[name] = value
    return identity


def _teacher_identity(job: JobConfig) -> dict[str, Any]:
    """The teacher's URI and, for a diffusers folder, the SHA-256 of its config.json (what identifies it)."""
    identity: dict[str, Any] = {"uri": job.teacher_uri}
    path = job.distill.teacher.path
    if path and (Path(path) / "config.json").is_file():
        identity["config_sha256"] = config_sha256(Path(path) / "config.json")
    return identity


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
