"""Rank 0's evaluations of a job: periodic (EMA student at 1 and 4 steps) and the final report (teacher vs student).

Both tasks go through the same two functions, each returning MLflow metrics and writing a PNG grid:
- 2-D: rcm_core.pipeline.evaluate_rows (mode coverage, precision, sliced W2) and a scatter grid;
- shapes: rcm_core.eval.shapes.evaluate (GenEval-style score, held-out score, diversity, recall) and an image grid.
  On a CPU the teacher is sampled at a few Euler steps only (cfg.eval.teacher_steps; CFG doubles its cost), and
  the report adds the shipped teacher's stored evaluation (50 Euler steps on a GPU, from its file's metadata),
  labelled as stored, with its hardware.
The sample count, the teacher's steps and the diversity sample count come from the job spec (cfg.eval).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from rcm_core import pipeline
from rcm_core.config import DistillConfig
from rcm_core.models.flow import FlowModel

TOY2D_METRICS = ("mode_coverage", "precision", "sliced_w2")
SHAPES_METRICS = ("overall", "held_out", "diversity", "recall")
SHAPES_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
_SWEEP_KEY = re.compile(r"^guidance_sweep_(\d+)_euler_steps")
_SWEEP_LINE = re.compile(r"^(all|held_out) w=([0-9.]+): (.*)$")


def periodic(cfg: DistillConfig, student: FlowModel, task, path: Path) -> dict[str, float]:
    """The EMA student at 1 and 4 steps on half of cfg.eval.num_samples; writes the sample grid to `path`.

    Returns:
        metrics named eval/<N>step/<metric>.
    """
    n, seed = max(10, cfg.eval.num_samples // 2), 0
    if cfg.task == "shapes":
        from rcm_core.eval import shapes as ev

        entries = [("student (EMA)", ev.student_sampler(student, mid_times=cfg.eval.student_mid_times), [1, 4])]
        rows, images = ev.evaluate(entries, num_samples=n, diversity_k=cfg.eval.diversity_samples, seed=seed)
        ev.image_grid(images, path)
        return _metrics(rows, SHAPES_METRICS)
    from rcm_core.eval.toy2d import scatter_grid

    entries = [pipeline.student_entry("student (EMA)", student, task, [1, 4], seed, cfg.eval.student_mid_times)]
    rows, samples = pipeline.evaluate_rows(entries, task, n, seed)
    scatter_grid(list(samples.items()), path, columns=2)
    return _metrics(rows, TOY2D_METRICS)


def final_report(
    cfg: DistillConfig, teacher: FlowModel, student: FlowModel, task, teacher_meta: dict, out: Path
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Teacher (cfg.eval.teacher_steps Euler steps) vs EMA student (cfg.eval.student_steps) on cfg.eval.num_samples;
    writes out/samples.png.

    Returns:
        (the report's rows, the student's metrics named eval/<N>step/<metric>)
    """
    w, e, seed = cfg.teacher.guidance_scale, cfg.eval, 0
    if cfg.task == "shapes":
        from rcm_core.eval import shapes as ev

        entries = [
            (f"teacher (Euler, CFG {w:g})", ev.teacher_sampler(teacher, w), e.teacher_steps),
            ("student (EMA)", ev.student_sampler(student, mid_times=e.student_mid_times), e.student_steps),
        ]
        rows, images = ev.evaluate(entries, num_samples=e.num_samples, diversity_k=e.diversity_samples, seed=seed)
        ev.image_grid(images, out / "samples.png")
        stored = stored_teacher_row(teacher_meta, w)
        students = [r for r in rows if r["model"].startswith("student")]
        return ([stored] if stored else []) + rows, _metrics(students, SHAPES_METRICS)
    from rcm_core.eval.toy2d import scatter_grid

    entries = [
        pipeline.teacher_entry(teacher, task, w, e.teacher_steps, seed),
        pipeline.student_entry("student (EMA)", student, task, e.student_steps, seed, e.student_mid_times),
    ]
    rows, samples = pipeline.evaluate_rows(entries, task, e.num_samples, seed)
    scatter_grid(list(samples.items()), out / "samples.png")
    return rows, _metrics([r for r in rows if r["model"].startswith("student")], TOY2D_METRICS)


def stored_teacher_row(meta: dict, guidance_scale: float) -> dict[str, Any] | None:
    """The shapes teacher's own evaluation from its file (`rcm teacher train` on a GPU) as a report row, at the
    stored guidance scale nearest to `guidance_scale`; None when the file holds none.

    The sweep is stored as lines "all w=2.0: overall=0.940 single_object=1.000 ..." and "held_out w=2.0: ...";
    diversity, recall and time were not measured there (NaN).
    """
    training = meta.get("training", {})
    key = next((k for k in training if _SWEEP_KEY.match(k)), None)
    if key is None:
        return None
    scores: dict[tuple[str, float], dict[str, float]] = {}
    for line in training[key]:
        if m := _SWEEP_LINE.match(line):
            pairs = (kv.split("=", 1) for kv in m.group(3).split())
            scores[(m.group(1), float(m.group(2)))] = {k: float(v) for k, v in pairs}
    ws = sorted({w for part, w in scores if part == "all"}, key=lambda w: abs(w - guidance_scale))
    if not ws:
        return None
    w = ws[0]
    steps = int(_SWEEP_KEY.match(key).group(1))  # type: ignore[union-attr]
    hardware = training.get("hardware", "unknown hardware").split(" (")[0]  # drop the software versions
    return {
        "model": f"teacher (stored: Euler, CFG {w:g}, {hardware})",
        "steps": steps,
        **{c: math.nan for c in SHAPES_CATEGORIES},
        **scores[("all", w)],
        "held_out": scores.get(("held_out", w), {}).get("overall", math.nan),
        "diversity": math.nan,
        "recall": math.nan,
        "ms_per_image": math.nan,
        "stored": True,
    }


def _metrics(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, float]:
    return {f"eval/{r['steps']}step/{k}": r[k] for r in rows for k in names if not math.isnan(r[k])}
