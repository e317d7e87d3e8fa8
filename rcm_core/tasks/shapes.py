"""The shapes task: text-to-image on 32x32 scenes of coloured shapes; the teacher (text encoder + DiT) ships in
rcm_core/assets, trained by `rcm teacher train --preset shapes`.

Metrics: the GenEval-style score (overall and per category), held-out score, diversity and recall
(rcm_core.eval.shapes). On a CPU the teacher is sampled at a few Euler steps only (cfg.eval.teacher_steps;
CFG doubles its cost), and the report adds the shipped teacher's stored evaluation (50 Euler steps on a GPU,
from its file's metadata), labelled as stored, with its hardware.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rcm_core.config import DistillConfig, shapes_rcm
from rcm_core.tasks.base import Task, register

SHIPPED_TEACHER = Path(__file__).parents[1] / "assets" / "shapes_teacher.safetensors"
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
_SWEEP_KEY = re.compile(r"^guidance_sweep_(\d+)_euler_steps")
_SWEEP_LINE = re.compile(r"^(all|held_out) w=([0-9.]+): (.*)$")


@register
class Shapes(Task):
    name = "shapes"
    datasets = ("shapes",)
    metric_names = ("overall", "held_out", "diversity", "recall")
    uses_cuda = True

    def preset(self, family: str | None = None) -> DistillConfig:
        return shapes_rcm()

    def builtin_teacher(self, cfg: DistillConfig, progress: Callable | None = None) -> tuple[torch.nn.Module, dict]:
        return self.load_teacher(SHIPPED_TEACHER)

    def load_teacher(self, path: Path) -> tuple[torch.nn.Module, dict]:
        from rcm_core.shapes_teacher import load_shapes_teacher

        return load_shapes_teacher(path)

    def build_data(self, cfg: DistillConfig, meta: dict, device: torch.device | None, access=None):
        from rcm_core.data.shapes import PooledShapesTask, ShapesTask, load_prompt_file

        prompts = load_prompt_file(cfg.data.prompt_file) if cfg.data.prompt_file else None
        if cfg.data.pool_size > 0:
            workers = min(8, os.cpu_count() or 1)
            return PooledShapesTask(
                cfg.data.pool_size, seed=cfg.train.seed, device=device or "cpu", workers=workers, prompts=prompts
            )
        return ShapesTask(prompts=prompts)

    def evaluate(self, cfg, entries, data, *, num_samples, seed, grid) -> list[dict[str, Any]]:
        from rcm_core.eval import shapes as ev

        w, mid = cfg.teacher.guidance_scale, cfg.eval.student_mid_times
        samplers = [
            (name, ev.teacher_sampler(model, w) if is_teacher else ev.student_sampler(model, mid_times=mid), steps)
            for name, model, steps, is_teacher in entries
        ]
        rows, images = ev.evaluate(samplers, num_samples=num_samples, diversity_k=cfg.eval.diversity_samples, seed=seed)
        ev.image_grid(images, grid)
        return rows

    def stored_rows(self, meta: dict, guidance_scale: float) -> list[dict[str, Any]]:
        row = stored_teacher_row(meta, guidance_scale)
        return [row] if row else []

    def network_config(self, cfg: DistillConfig, meta: dict) -> dict[str, Any]:
        return meta["config"]

    def format_table(self, rows: list[dict]) -> str:
        from rcm_core.eval.shapes import format_table

        return format_table(rows)


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
        **{c: math.nan for c in CATEGORIES},
        **scores[("all", w)],
        "held_out": scores.get(("held_out", w), {}).get("overall", math.nan),
        "diversity": math.nan,
        "recall": math.nan,
        "ms_per_image": math.nan,
        "stored": True,
    }
