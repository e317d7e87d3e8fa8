"""Diversity of samples for one prompt, relative to the data for that prompt.

Each image is reduced to the free attributes of the prompt's first named object (found by the
GenEval-style detector): centroid (x, y) / 32, size (0 small, 1 large), and the colour as a one-hot
vector when the prompt leaves it free. Two numbers, for K samples against K data images of the prompt:

- `diversity`: mean pairwise distance of the samples' features divided by the same for the data
  (1.0 = as spread out as the data, 0 = every sample identical; images without the object are skipped);
- `recall`: improved recall (Kynkaenniemi et al., arXiv 1904.06991) with k = 3: the fraction of data
  features that fall inside some sample's k-nearest-neighbour ball (images without the object cover nothing).
"""

from __future__ import annotations

import numpy as np

from rcm_core.data.shapes import COLORS, IMAGE_SIZE, Prompt, render
from rcm_core.eval.geneval import _matches, detect

_COLOR_NAMES = list(COLORS)


def features(prompt: Prompt, images: list[np.ndarray]) -> np.ndarray:
    """(M, F) features of the images where the prompt's first object was found (M <= len(images))."""
    shape, color = prompt.objects[0]
    rows = []
    for image in images:
        found = [o for o in detect(image) if _matches(o, shape, color)]
        if not found:
            continue
        obj = found[0]
        row = [obj.cx / IMAGE_SIZE, obj.cy / IMAGE_SIZE, 1.0 if obj.size == "large" else 0.0]
        if color is None:
            row += [1.0 if obj.color == c else 0.0 for c in _COLOR_NAMES]
        rows.append(row)
    width = 3 + (len(_COLOR_NAMES) if color is None else 0)
    return np.array(rows, dtype=np.float64).reshape(-1, width)


def mean_pairwise_distance(x: np.ndarray) -> float:
    if len(x) < 2:
        return 0.0
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    return float(d.sum() / (len(x) * (len(x) - 1)))


def improved_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> float:
    if len(real) == 0:
        return 0.0
    if len(fake) <= k:
        return 0.0
    d_ff = np.sqrt(((fake[:, None] - fake[None]) ** 2).sum(-1))
    radii = np.sort(d_ff, axis=1)[:, k]  # k-th neighbour (index 0 is the point itself)
    d_rf = np.sqrt(((real[:, None] - fake[None]) ** 2).sum(-1))  # (R, F)
    return float((d_rf <= radii[None, :] + 1e-12).any(axis=1).mean())


def data_images(prompt: Prompt, k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [render(prompt, rng)[0] for _ in range(k)]


def diversity_report(prompt: Prompt, images: list[np.ndarray], *, seed: int = 0) -> dict[str, float]:
    """diversity and recall of `images` (K samples for `prompt`) against K fresh data images."""
    real = features(prompt, data_images(prompt, len(images), seed))
    fake = features(prompt, images)
    base = mean_pairwise_distance(real)
    return {
        "diversity": mean_pairwise_distance(fake) / base if base > 0 else 0.0,
        "recall": improved_recall(real, fake),
        "found_fraction": len(fake) / max(len(images), 1),
    }
