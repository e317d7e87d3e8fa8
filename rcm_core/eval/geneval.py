"""A deterministic GenEval-style judge for the shapes task (GenEval: Ghosh et al., arXiv 2310.11513).

Detection is classical image analysis: pixels brighter than a threshold form objects (4-connected
components of at least 6 pixels); colour is the nearest palette colour to the component's mean;
shape comes from two scale-free features:
  fill = area / bounding-box area (square ~ 1, circle ~ 0.75, triangle ~ 0.55)
  tilt = pixels in the lower half of the box / pixels in the upper half (triangle > 1.5, else ~ 1).
Judging follows GenEval's rules: an object is present if a detection of its shape (and colour, when the
prompt names one) exists; counting needs exactly that many of the shape; position compares centroids of
the named objects (GenEval also requires the offset to dominate, as here: the main-axis gap must exceed
the cross-axis gap). The score is the mean over categories of per-category accuracy.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from rcm_core.data.shapes import CATEGORIES, COLORS, Prompt, SceneObject

MIN_PIXELS = 6
THRESHOLD = 60  # max channel value that separates objects from the black background
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
_COLOR_NAMES = list(COLORS)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask as (N, 2) arrays of (row, col)."""
    seen = np.zeros_like(mask)
    comps = []
    h, w = mask.shape
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        queue, pixels = deque([(r0, c0)]), []
        seen[r0, c0] = True
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        comps.append(np.array(pixels))
    return comps


def classify_shape(pixels: np.ndarray) -> str:
    rows, cols = pixels[:, 0], pixels[:, 1]
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    fill = len(pixels) / (height * width)
    mid = (rows.min() + rows.max()) / 2
    lower, upper = (rows > mid).sum(), (rows < mid).sum()
    tilt = lower / max(upper, 1)
    if tilt > 1.5:
        return "triangle"
    return "square" if fill > 0.88 else "circle"


def detect(image: np.ndarray) -> list[SceneObject]:
    """Objects in a (32, 32, 3) uint8 image (or float in [0, 255])."""
    img = np.asarray(image, dtype=np.float64)
    mask = img.max(axis=2) > THRESHOLD
    objects = []
    for pixels in _components(mask):
        if len(pixels) < MIN_PIXELS:
            continue
        mean_rgb = img[pixels[:, 0], pixels[:, 1]].mean(axis=0)
        color = _COLOR_NAMES[int(np.argmin(((_PALETTE - mean_rgb) ** 2).sum(axis=1)))]
        height = pixels[:, 0].max() - pixels[:, 0].min() + 1
        size = "large" if height >= 11 else "small"
        objects.append(
            SceneObject(classify_shape(pixels), color, size, float(pixels[:, 1].mean()), float(pixels[:, 0].mean()))
        )
    return objects


def _matches(obj: SceneObject, shape: str, color: str | None) -> bool:
    return obj.shape == shape and (color is None or obj.color == color)


def judge(prompt: Prompt, objects: list[SceneObject]) -> bool:
    """Does a detected scene satisfy the prompt (GenEval's rules)?"""
    (s0, c0), *rest = prompt.objects
    first = [o for o in objects if _matches(o, s0, c0)]
    if prompt.category == "counting":
        return len(first) == prompt.count
    if not first:
        return False
    if prompt.category in ("single_object", "colors"):
        return True
    s1, c1 = rest[0]
    second = [o for o in objects if _matches(o, s1, c1)]
    if not second:
        return False
    if prompt.category != "position":
        return True
    for a in first:
        for b in second:
            dx, dy = b.cx - a.cx, b.cy - a.cy  # a is "<relation>" b
            ok = {
                "left of": dx > abs(dy),
                "right of": -dx > abs(dy),
                "above": dy > abs(dx),
                "below": -dy > abs(dx),
            }[prompt.relation or ""]
            if ok:
                return True
    return False


def score(prompts: list[Prompt], images: list[np.ndarray]) -> dict[str, float]:
    """Per-category accuracy and `overall` = mean over the categories present."""
    hits: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    for prompt, image in zip(prompts, images, strict=True):
        hits[prompt.category].append(judge(prompt, detect(image)))
    per_cat = {c: float(np.mean(v)) for c, v in hits.items() if v}
    return {"overall": float(np.mean(list(per_cat.values()))), **per_cat}
