"""The shapes benchmark: the shipped teacher vs. distilled students at 1, 2 and 4 steps.

    rcm bench shapes --run rCM=runs/shapes-rcm --run sCM=runs/shapes-scm --run DMD=runs/shapes-dmd --out DIR

Each run directory holds a distillation of the same teacher (`rcm distill configs/shapes-*.yaml`); its latest
checkpoint's EMA student is evaluated (`--weights raw`: the raw student, rows labelled "(raw)").
The teacher is evaluated at its default sampler (50 Euler steps with its
distilled CFG scale) and at 4 steps. Writes DIR/table.md, DIR/report.json and DIR/grid.png (one row per model
and step count, same prompts and seeds).
"""

from __future__ import annotations

from pathlib import Path

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
    run's eval.student_mid_times, one row group per schedule; `weights` picks the EMA or the raw student."""
    from rcm_core import pipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    entries, teacher, steps_done = [], None, {}
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
    rows, images = ev.evaluate(entries, num_samples=num_samples, diversity_k=diversity_k, seed=seed)
    table = ev.format_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    extra = {
        "device": device_name,
        "student_steps_trained": steps_done,
        "num_samples": num_samples,
        "weights": weights,
        "student_mid_times": mid_times or "per run (eval.student_mid_times)",
    }
    files = [
        ev.save_report(rows, out, extra=extra),
        ev.image_grid(images, out / "grid.png"),
    ]
    (out / "table.md").write_text(table + "\n")
    files.append(out / "table.md")
    return table, files
