"""The moving-shapes benchmark: the Wan-architecture teacher vs. its distilled students at 1, 2 and 4 steps.

    rcm bench moving-shapes --teacher TEACHER_DIR --run rCM=RUN --run rCM=RUN_SEED1 --run sCM=RUN --run DMD=RUN \
        --out DIR [--seeds 1000,2000] [--num-samples 1024] [--diversity-samples 32]

TEACHER_DIR is a moving-shapes teacher folder (`rcm teacher train --preset moving-shapes`: diffusers
WanTransformer3DModel + moving_shapes.json with its frozen text encoder and default sampler). Each RUN is either
a distillation run directory of the `diffusers` task (its latest checkpoint's EMA student and the run's
eval.student_mid_times) or a diffusers-format student export (transformer/ and the sampler record of
rcm_core.export; a bare transformer folder takes the default mid times). Repeating a NAME (e.g. two training
seeds of rCM) and giving several sampling --seeds average the row over every (run, seed), with its spread.
The teacher is evaluated at its default sampler (moving_shapes.json) and at 4 Euler steps; the target checks
(rcm_core.eval.moving_shapes.check_targets) use the names rCM, sCM and DMD.
Writes DIR/table.md (table and targets), DIR/report.json and DIR/strip.png + strip.gif (teacher vs. students
on STRIP_PROMPTS).
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch

from rcm_core.config import ConfigError
from rcm_core.eval import moving_shapes as ev
from rcm_core.eval import report_json
from rcm_core.models.flow import FlowModel
from rcm_core.sampling import DEFAULT_MID_TIMES

STUDENT_STEPS = (1, 2, 4)


def load_student(name: str, path: Path, device: torch.device) -> tuple[FlowModel, list[float], str]:
    """(the student as a FlowModel on `device`, its mid times, what was loaded) from a run directory or an export."""
    from rcm_core import export
    from rcm_core.checkpoint import latest_checkpoint

    if (path / "checkpoints").is_dir():
        from rcm_core import pipeline

        ckpt = latest_checkpoint(path / "checkpoints")
        if ckpt is None:
            raise ConfigError(f"--run {name}={path}: no checkpoint under {path / 'checkpoints'}")
        distiller, cfg, _ = pipeline.load_student(ckpt)
        if cfg.task != "diffusers":
            raise ConfigError(f"--run {name}={path}: a {cfg.task!r} run, not a diffusers (moving-shapes) one")
        return distiller.ema.model.to(device).eval(), list(cfg.eval.student_mid_times), f"{ckpt} (EMA)"
    folder = export.transformer_dir(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"--run {name}={path}: neither a run directory (checkpoints/) nor a diffusers export")
    from rcm_core.teachers import load_diffusers_net

    record = export.read_sampler_record(path) or {}
    net, _, _ = load_diffusers_net(folder, dtype=torch.float32)
    return FlowModel(net, "rf").to(device).eval(), list(record.get("mid_times", DEFAULT_MID_TIMES)), str(folder)


def run_moving_shapes_benchmark(
    teacher_dir: Path,
    runs: list[tuple[str, Path]],
    out: Path,
    *,
    num_samples: int = 1024,
    diversity_k: int = 32,
    seeds: list[int] | None = None,
    teacher_steps: list[int] | None = None,
    mid_times: list[float] | None = None,
    students: list[tuple[str, FlowModel, list[float]]] | None = None,
    judge_workers: int = 0,
    student_steps: list[int] | None = None,
) -> tuple[str, list[Path]]:
    """Evaluate the teacher and every student; returns the markdown (table + targets) and the files written.

    `students` adds already-built (name, FlowModel, mid times) students to those loaded from `runs`;
    `mid_times` overrides every student's; `judge_workers` > 1 judges clips in that many processes;
    `student_steps` defaults to 1, 2 and 4."""
    from rcm_core.moving_shapes_teacher import load_moving_shapes_teacher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seeds = seeds or [1000]
    student_steps = list(student_steps or STUDENT_STEPS)
    try:
        net, encoder, meta = load_moving_shapes_teacher(teacher_dir, device=device)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--teacher {teacher_dir}: not a moving-shapes teacher folder ({exc})") from None
    default = meta["default_sampler"]
    w, t_default = float(default["guidance_scale"]), int(default["steps"])
    teacher_label = f"teacher (Euler, CFG {w:g})"
    models = [(teacher_label, ev.teacher_sampler(FlowModel(net, "rf"), encoder, w), teacher_steps or [t_default, 4])]
    loaded = {}
    for name, path in runs:
        flow, times, what = load_student(name, path, device)
        loaded.setdefault(name, []).append(what)
        models.append((name, ev.student_sampler(flow, encoder, mid_times or times), student_steps))
    for name, flow, times in students or []:
        loaded.setdefault(name, []).append("in-memory")
        models.append((name, ev.student_sampler(flow.to(device).eval(), encoder, mid_times or times), student_steps))

    evaluations: dict[tuple[str, int], list[dict]] = {}
    panels: dict[str, object] = {}
    # spawn, not fork: the parent holds CUDA and torch threads; the workers import numpy code only
    pool = multiprocessing.get_context("spawn").Pool(judge_workers) if judge_workers > 1 else None
    try:
        for name, sampler, steps_list in models:
            for steps in steps_list:
                for seed in seeds:
                    metrics, clips = ev.evaluate_one(
                        sampler, steps, num_samples=num_samples, diversity_k=diversity_k, seed=seed, pool=pool
                    )
                    evaluations.setdefault((name, steps), []).append(metrics)
                    panels.setdefault(f"{name} {steps}-step", clips["strip"])
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    rows = [ev.aggregate(name, steps, evs) for (name, steps), evs in evaluations.items()]
    targets = ev.check_targets(rows, teacher=teacher_label, teacher_steps=(teacher_steps or [t_default])[0])
    table = ev.format_table(rows)
    text = f"{table}\n\nTargets (issue 20):\n{ev.format_targets(targets)}\n"
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "rows": rows,
        "targets": targets,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "teacher": str(teacher_dir),
        "teacher_default_sampler": default,
        "students": loaded,
        "seeds": seeds,
        "num_samples": num_samples,
        "diversity_k": diversity_k,
        "student_mid_times": mid_times or "per run",
        "judge": "rcm_core.eval.clip_judge.score_clips",
        "judge_workers": judge_workers,
    }
    (out / "report.json").write_text(report_json(report))
    (out / "table.md").write_text(text)
    files = [out / "report.json", out / "table.md", *ev.write_strip(panels, out / "strip.png")]
    return text, files
