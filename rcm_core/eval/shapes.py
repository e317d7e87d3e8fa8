"""The shapes benchmark: GenEval-style score, diversity and sampling time of teachers and few-step students.

One row per (model, sampling steps):
- `overall` and per-category scores (rcm_core.eval.geneval) over the benchmark prompts: every prompt of the
  grammar in a fixed order, cycled to `num_samples` images (category mean, so the imbalance of categories does
  not matter); `held_out` is the overall score restricted to the held-out prompts (never seen in training);
- `diversity` / `recall` (rcm_core.eval.diversity): mean over DIVERSITY_PROMPTS of K samples each, over seeds;
- `ms_per_image`: wall-clock sampling time per image (batched, including CFG for the teacher).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rcm_core.data.shapes import Prompt, ShapesTask, all_prompts, parse_caption, to_uint8
from rcm_core.eval import report_json
from rcm_core.eval.diversity import diversity_report
from rcm_core.eval.geneval import score
from rcm_core.models.flow import FlowModel, guided_f
from rcm_core.sampling import DEFAULT_MID_TIMES, sample_consistency, sample_euler, student_times

# One prompt per category that leaves position, size and (where unnamed) colour free.
DIVERSITY_PROMPTS = (
    "a photo of a circle",
    "a photo of a red square",
    "a photo of a triangle and a circle",
    "a photo of a square above a triangle",
)

# The grid's columns: two prompts per harder category, same seeds for every row.
GRID_PROMPTS = (
    "a photo of a square",
    "a photo of a blue triangle",
    "a photo of three circles",
    "a photo of four squares",
    "a photo of a circle left of a triangle",
    "a photo of a triangle below a square",
    "a photo of a red circle and a green square",
    "a photo of a yellow triangle and a blue circle",
)

Sampler = Callable[[list[Prompt], int, int], np.ndarray]  # (prompts, steps, seed) -> (N, 32, 32, 3) uint8


def benchmark_prompts(num_samples: int) -> list[Prompt]:
    """Every grammar prompt in a fixed order, cycled to `num_samples` entries."""
    base = all_prompts()
    return [base[i % len(base)] for i in range(num_samples)]


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _chunked(model: FlowModel, batch_size: int, draw) -> Sampler:
    """A Sampler that encodes the prompts in chunks and calls draw(cond, noise, n, seed) -> x0 under autocast."""
    task, device = ShapesTask(), next(model.parameters()).device

    @torch.no_grad()
    def sample(prompts: list[Prompt], steps: int, seed: int) -> np.ndarray:
        gen, out = torch.Generator().manual_seed(seed), []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            cond = {k: v.to(device) for k, v in task._encode([p.caption() for p in chunk]).items()}
            noise = torch.randn((len(chunk), *task.sample_shape), generator=gen).to(device)
            with _autocast(device):
                out.append(to_uint8(draw(cond, noise, steps, seed + i)))
        return np.concatenate(out)

    return sample


def teacher_sampler(model: FlowModel, guidance_scale: float, *, batch_size: int = 256) -> Sampler:
    """Euler (DDIM) sampling of the teacher with classifier-free guidance."""
    task = ShapesTask()

    def draw(cond, noise, steps, _seed):
        null = {k: v.to(noise.device) for k, v in task.null_cond(len(noise)).items()}
        return sample_euler(lambda x, t: guided_f(model, x, t, cond, null, guidance_scale), noise, steps)

    return _chunked(model, batch_size, draw)


def student_sampler(model: FlowModel, *, batch_size: int = 256, mid_times=DEFAULT_MID_TIMES) -> Sampler:
    """Few-step consistency sampling of a student (guidance is distilled in: one network call per step)."""

    def draw(cond, noise, steps, seed):
        gen = torch.Generator(device=noise.device).manual_seed(seed)
        times = student_times(steps, mid_times)
        return sample_consistency(lambda x, t: model(x, t, cond), noise, times, generator=gen)

    return _chunked(model, batch_size, draw)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def evaluate(
    entries: list[tuple[str, Sampler, list[int]]],
    *,
    num_samples: int,
    diversity_k: int = 32,
    seed: int = 0,
    keep_images: dict | None = None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Rows of the benchmark table and, per row, the images of GRID_PROMPTS (for `image_grid`).

    `keep_images`, when given, receives per row label the benchmark images and the diversity images (what
    `score_images` needs to re-score the same samples with another judge, e.g. `images.npz` of the bench)."""
    prompts = benchmark_prompts(num_samples)
    div_prompts = [parse_caption(c) for c in DIVERSITY_PROMPTS]
    rows, images = [], {}
    for name, sampler, steps_list in entries:
        for steps in steps_list:
            sampler(prompts[:8], steps, seed)  # warm-up (kernel compilation, allocator)
            _sync()
            start = time.perf_counter()
            imgs = sampler(prompts, steps, seed)
            _sync()
            ms = 1e3 * (time.perf_counter() - start) / len(prompts)
            div_imgs = [sampler([p] * diversity_k, steps, seed + 1 + j) for j, p in enumerate(div_prompts)]
            rows.append(score_images(name, steps, imgs, div_imgs, ms_per_image=ms, seed=seed))
            label = f"{name} {steps}-step"
            images[label] = sampler([parse_caption(c) for c in GRID_PROMPTS], steps, seed + 100)
            if keep_images is not None:
                keep_images[label] = {"images": np.asarray(imgs), "diversity": np.stack(div_imgs)}
    return rows, images


def score_images(
    name: str, steps: int, imgs: np.ndarray, div_imgs: list[np.ndarray], *, ms_per_image: float, seed: int
) -> dict:
    """One table row from a model's benchmark images (`benchmark_prompts(len(imgs))`, in order) and its
    DIVERSITY_PROMPTS images (one array of K per prompt, sampled with seeds seed + 1 + j)."""
    prompts = benchmark_prompts(len(imgs))
    held = [i for i, p in enumerate(prompts) if p.is_held_out()]
    s = score(prompts, list(imgs))
    held_score = score([prompts[i] for i in held], [imgs[i] for i in held])["overall"] if held else math.nan
    div = [
        diversity_report(parse_caption(c), list(d), seed=seed + 1 + j)
        for j, (c, d) in enumerate(zip(DIVERSITY_PROMPTS, div_imgs, strict=True))
    ]
    return {
        "model": name,
        "steps": steps,
        **s,
        "held_out": held_score,
        "diversity": float(np.mean([d["diversity"] for d in div])),
        "recall": float(np.mean([d["recall"] for d in div])),
        "ms_per_image": ms_per_image,
    }


def _cell(value, digits: int) -> str:
    """A table cell: '-' for a metric that was not measured (None or NaN)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_table(rows: list[dict]) -> str:
    cats = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    head = "| model | steps | score | " + " | ".join(cats) + " | held-out | diversity | recall | ms / image |"
    lines = [head, "|---|---:|" + "---:|" * (len(cats) + 5)]
    for r in rows:
        cells = [_cell(r.get(c), 2) for c in cats]
        tail = [_cell(r.get(c), 2) for c in ("held_out", "diversity", "recall", "ms_per_image")]
        head_cells = f"| {r['model']} | {r['steps']} | {_cell(r.get('overall'), 3)} | "
        lines.append(head_cells + " | ".join(cells + tail) + " |")
    return "\n".join(lines)


def image_grid(panels: dict[str, np.ndarray], path: Path, *, columns: int = 8, scale: int = 3) -> Path:
    """One row per panel: its title, then its first `columns` images (same prompts and seeds across rows)."""
    from PIL import Image, ImageDraw

    cell = 32 * scale + 4
    title_w = max(150, 4 * max((len(t) for t in panels), default=0) + 12)  # the default font: ~4 px a character
    img = Image.new("RGB", (title_w + columns * cell, len(panels) * cell), "white")
    draw = ImageDraw.Draw(img)
    for r, (title, images) in enumerate(panels.items()):
        draw.text((4, r * cell + cell // 2 - 6), title, fill="black")
        for c, im in enumerate(images[:columns]):
            tile = Image.fromarray(np.asarray(im)).resize((32 * scale, 32 * scale), Image.NEAREST)
            img.paste(tile, (title_w + c * cell + 2, r * cell + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_report(rows: list[dict], out_dir: Path, *, extra: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(report_json({"rows": rows, **(extra or {})}))
    return path
