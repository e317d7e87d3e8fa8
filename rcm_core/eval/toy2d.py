"""Metrics, tables and scatter plots for the 2-D benchmark.

- mode coverage: fraction of modes holding at least 20% of their fair share (N / M) of samples within 3 std;
- precision: fraction of samples within 3 std of some mode;
- sliced Wasserstein-2 distance to fresh data samples (256 fixed random directions, lower is better).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from rcm_core.data.toy2d import Toy2DTask
from rcm_core.eval import report_json

METRICS = ("mode_coverage", "precision", "sliced_w2")


def toy2d_metrics(samples: torch.Tensor, task: Toy2DTask, *, seed: int = 1234) -> dict[str, float]:
    """Quality of (N, 2) samples against the task's mixture."""
    samples = samples.float()
    if not torch.isfinite(samples).all():
        return {"mode_coverage": 0.0, "precision": 0.0, "sliced_w2": float("inf")}
    n, m = samples.shape[0], len(task.centres)
    dist = torch.cdist(samples, task.centres)  # (N, M)
    near = dist < 3 * task.mode_std
    per_mode = near.sum(dim=0).float()
    coverage = (per_mode >= 0.2 * n / m).float().mean().item()
    precision = near.any(dim=1).float().mean().item()
    gen = torch.Generator().manual_seed(seed)
    ref, _ = task.sample(n, generator=gen)
    directions = torch.randn(256, 2, generator=gen)
    directions = directions / directions.norm(dim=1, keepdim=True)
    proj_a = (samples @ directions.T).sort(dim=0).values
    proj_b = (ref @ directions.T).sort(dim=0).values
    swd = (proj_a - proj_b).square().mean().sqrt().item()
    return {"mode_coverage": coverage, "precision": precision, "sliced_w2": swd}


def format_table(rows: list[dict]) -> str:
    """Markdown table of rows with keys model, steps, mode_coverage, precision, sliced_w2, sec_per_1k."""
    head = "| model | steps | mode coverage | precision | sliced W2 | ms / 1k samples |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['mode_coverage']:.3f} | {r['precision']:.3f} | "
            f"{r['sliced_w2']:.4f} | {r['ms_per_1k']:.1f} |"
        )
    return "\n".join(lines)


def save_report(rows: list[dict], out_dir: Path, *, extra: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(report_json({"rows": rows, **(extra or {})}))
    return path


def scatter_grid(panels: list[tuple[str, torch.Tensor]], path: Path, *, columns: int = 4, size: int = 220) -> Path:
    """One scatter panel per (title, samples); axes span [-2.5, 2.5]."""
    rows = math.ceil(len(panels) / columns)
    img = Image.new("RGB", (columns * size, rows * (size + 16)), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, pts) in enumerate(panels):
        ox, oy = (i % columns) * size, (i // columns) * (size + 16)
        draw.rectangle([ox + 2, oy + 16, ox + size - 3, oy + size + 13], outline=(180, 180, 180))
        draw.text((ox + 6, oy + 2), title, fill="black")
        xy = pts[:2000].float().clamp(-2.5, 2.5)
        px = ox + (xy[:, 0] + 2.5) / 5.0 * (size - 8) + 4
        py = oy + 16 + (2.5 - xy[:, 1]) / 5.0 * (size - 8) + 4
        for x, y in zip(px.tolist(), py.tolist(), strict=True):
            draw.point((x, y), fill=(30, 80, 200))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
