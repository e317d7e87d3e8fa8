"""The shapes benchmark: the shipped teacher vs. distilled students at 1, 2 and 4 steps.

    rcm bench shapes --run rCM=runs/shapes-rcm --run sCM=runs/shapes-scm --run DMD=runs/shapes-dmd --out DIR

Each run directory holds a distillation of the same teacher (`rcm distill configs/shapes-*.yaml`); its latest
checkpoint's EMA student is evaluated (`--weights raw`: the raw student, rows labelled "(raw)").
The teacher is evaluated at its default sampler (50 Euler steps with its
distilled CFG scale) and at 4 steps. Writes DIR/table.md, DIR/report.json, DIR/grid.png (one row per model
and step count, same prompts and seeds) and DIR/images.npz (every row's benchmark and diversity images).

    rcm bench shapes --teacher-only --out DIR       # the shipped teacher's rows alone (no students needed)
    rcm bench shapes --rescore DIR --out DIR2       # re-score DIR/images.npz with the current judge, no sampling

Re-scoring exists because the judge was fixed after the first tables were made (issue 20): the same samples
scored by the old and the new detector show what the fix changed, without sampling again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rcm_core.checkpoint import latest_checkpoint
from rcm_core.config import ConfigError
from rcm_core.eval import shapes as ev


def run_shapes_benchmark(
    runs: dict[str, Path],
    out: Path,
    *,
    num_samples: int = 1008,
    diversity_k: int = 32,
    teacher_steps: list[int] | None = None,
    seed: int = 1000,
    mid_times: list[list[float]] | None = None,
    weights: str = "ema",
) -> tuple[str, list[Path]]:
    """Evaluate the teacher and every run's latest student; `mid_times` (one or more schedules) overrides each
    run's eval.student_mid_times, one row group per schedule; `weights` picks the EMA or the raw student.
    With no runs, the shipped teacher alone (at the shapes preset's CFG scale)."""
    from rcm_core import pipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    entries, teacher, steps_done = [], None, {}
    if not runs:
        from rcm_core.config import shapes_rcm
        from rcm_core.models.flow import FlowModel
        from rcm_core.shapes_teacher import load_shapes_teacher
        from rcm_core.tasks.shapes import SHIPPED_TEACHER

        w = shapes_rcm().teacher.guidance_scale
        teacher = FlowModel(load_shapes_teacher(SHIPPED_TEACHER)[0], "rf").to(device)
        entries.append((f"teacher (Euler, CFG {w:g})", ev.teacher_sampler(teacher, w), teacher_steps or [50, 4]))
    for name, run_dir in runs.items():
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            raise ConfigError(f"--run {name}={run_dir}: no checkpoint under {run_dir / 'checkpoints'}")
        distiller, cfg, _ = pipeline.load_student(ckpt)
        if cfg.task != "shapes":
            raise ConfigError(f"--run {name}={run_dir}: a {cfg.task!r} run, not shapes")
        steps_done[name] = distiller.step
        if teacher is None:
            w = cfg.teacher.guidance_scale
            teacher = distiller.teacher.to(device)
            entries.append((f"teacher (Euler, CFG {w:g})", ev.teacher_sampler(teacher, w), teacher_steps or [50, 4]))
        model = (distiller.ema.model if weights == "ema" else distiller.student).to(device).eval()
        schedules = mid_times or [cfg.eval.student_mid_times]
        for times in schedules:
            label = name if weights == "ema" else f"{name} (raw)"
            if len(schedules) > 1:
                label += f" (t={','.join(f'{v:g}' for v in times)})"
            entries.append((label, ev.student_sampler(model, mid_times=times), [1, 2, 4]))
    kept: dict = {}
    rows, images = ev.evaluate(entries, num_samples=num_samples, diversity_k=diversity_k, seed=seed, keep_images=kept)
    table = ev.format_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    extra = {
        "device": device_name,
        "student_steps_trained": steps_done,
        "num_samples": num_samples,
        "weights": weights,
        "student_mid_times": mid_times or "per run (eval.student_mid_times)",
        "diversity_k": diversity_k,
        "seed": seed,
    }
    files = [
        ev.save_report(rows, out, extra=extra),
        ev.image_grid(images, out / "grid.png"),
        _save_images(kept, out / "images.npz"),
    ]
    (out / "table.md").write_text(table + "\n")
    files.append(out / "table.md")
    return table, files


def _save_images(kept: dict, path: Path) -> Path:
    """Row label -> images as `<i>/images`, `<i>/diversity` arrays (npz keys cannot hold every label)."""
    arrays = {}
    for i, item in enumerate(kept.values()):
        arrays[f"{i}/images"], arrays[f"{i}/diversity"] = item["images"], item["diversity"]
    np.savez_compressed(path, **arrays)
    return path


def rescore_shapes_benchmark(source: Path, out: Path) -> tuple[str, list[Path]]:
    """Re-score a finished bench directory (its report.json rows and images.npz) with the current judge."""
    try:
        report = json.loads((source / "report.json").read_text())
        stored = np.load(source / "images.npz")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--rescore {source}: needs report.json and images.npz of `rcm bench shapes` ({exc})"
        ) from None
    rows = []
    for i, old in enumerate(report["rows"]):
        if f"{i}/images" not in stored:
            raise ConfigError(f"--rescore {source}: images.npz has no images for row {i} ({old['model']})")
        rows.append(
            ev.score_images(
                old["model"],
                old["steps"],
                stored[f"{i}/images"],
                list(stored[f"{i}/diversity"]),
                ms_per_image=old["ms_per_image"],
                seed=report.get("seed", 1000),
            )
        )
    table = ev.format_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    extra = {k: v for k, v in report.items() if k != "rows"} | {"rescored_from": str(source)}
    files = [ev.save_report(rows, out, extra=extra)]
    (out / "table.md").write_text(table + "\n")
    files.append(out / "table.md")
    return table, files
