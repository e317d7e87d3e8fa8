"""`rcm bench toy2d`: the full 2-D table (teacher Euler at several step counts; sCM-only, DMD-only and
rCM students at 1/2/4 steps), saved as JSON, Markdown and a PNG scatter grid.

Every student starts from the same cached teacher and uses the same seed and schedule; only the loss
weights differ (sCM-only: lambda = 0; DMD-only: sCM weight 0).
"""

from __future__ import annotations

import dataclasses
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from rcm_core import pipeline
from rcm_core.config import PRESETS, apply_overrides
from rcm_core.eval import report_json
from rcm_core.eval.toy2d import format_table
from rcm_core.tasks import eval_seed, get_task


def run_toy2d_benchmark(out: Path, *, overrides: list[str], reporter=pipeline._quiet) -> tuple[str, list[Path]]:
    """Train the three students (resuming finished runs), evaluate all rows; returns the table and files."""
    out.mkdir(parents=True, exist_ok=True)
    students = {}
    seconds = {}
    cfg = None
    for name in ("toy2d-scm", "toy2d-dmd", "toy2d-rcm"):
        cfg = apply_overrides(PRESETS[name](), [f"train.output_dir={out / name}"] + overrides)
        start = time.perf_counter()
        students[name] = pipeline.distill(cfg, resume=True, reporter=reporter)
        seconds[name] = round(time.perf_counter() - start, 1)
    assert cfg is not None
    distiller = students["toy2d-rcm"]
    labels = {"toy2d-scm": "sCM-only", "toy2d-dmd": "DMD-only", "toy2d-rcm": "rCM"}
    entries = [("teacher (Euler)", distiller.teacher, cfg.eval.teacher_steps, True)]
    entries += [(f"{labels[name]} (EMA)", d.ema.model, cfg.eval.student_steps, False) for name, d in students.items()]
    grid = out / "samples.png"
    rows = get_task("toy2d").evaluate(
        cfg, entries, distiller.task, num_samples=cfg.eval.num_samples, seed=eval_seed(cfg), grid=grid
    )
    table = format_table(rows)
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "train_seconds": seconds,
        "overrides": overrides,
        "config_rcm": dataclasses.asdict(cfg),
    }
    (out / "report.json").write_text(report_json({"rows": rows, **meta}))
    (out / "table.md").write_text(table + "\n")
    return table, [out / "report.json", out / "table.md", grid]
