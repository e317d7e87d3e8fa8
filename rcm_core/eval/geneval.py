"""A deterministic GenEval-style judge for the shapes task (GenEval: Ghosh et al., arXiv 2310.11513).

Detection is classical image analysis on the renderer's own vocabulary (rcm_core.data.shapes: four palette
colours on black, three shapes at two sizes), numpy only:

1. Colour-aware segmentation. Every pixel p is fitted to each palette colour P_k as a scaled copy
   a_k P_k (a_k = p.P_k / |P_k|^2 clipped to [0, MAX_ALPHA]: a blurred edge is the colour faded towards the
   black background; a model's over-saturated colour is the palette colour brightened) with residual
   r_k = |p - a_k P_k|. A pixel belongs to colour k when k has the smallest residual,
   a_k >= 0.5 (the half-intensity contour, which blur moves least) and r_k <= MAX_RESIDUAL (far from every
   palette colour = not an object pixel). Objects are 4-connected components of one colour, so two touching
   objects of different colours are two components (the blend pixels between them fit neither or a third
   colour and are dropped).
2. Shape and size by template IoU: each component's mask is compared with the renderer's own masks
   (`shapes._shape_mask`) of every shape and size, at integer offsets around the component's centroid; the
   best IoU names shape and size. A component whose best IoU is below MIN_IOU is not an object (noise
   blobs, streaks); a large one is first tried as several touching objects of one colour (`_peel`).
3. Noise rejection: besides the IoU test, an object's pixels must sit close to its palette colour
   (mean residual <= MAX_MEAN_RESIDUAL) and be mostly at full intensity (median a_k >= MIN_MEDIAN_ALPHA):
   smooth random colour fields pass near a palette colour only in patches of graded intensity.

Judging follows GenEval's rules: an object is present if a detection of its shape (and colour, when the
prompt names one) exists; counting needs exactly that many of the shape; position compares centroids of
the named objects (GenEval also requires the offset to dominate, as here: the main-axis gap must exceed
the cross-axis gap). The score is the mean over categories of per-category accuracy.

Measured (tests/unit/test_geneval_judge.py): >= 99% agreement with the renderer on its own images under mild
degradation (Gaussian blur sigma <= 0.7 px, then Gaussian noise sd <= 10 on the 0-255 scale), <= 0.05 overall
on noise images, touching objects of different colours split.
"""

from __future__ import annotations

import functools
from collections import deque

import numpy as np

from rcm_core.data.shapes import CATEGORIES, COLORS, SHAPES, SIZES, Prompt, SceneObject, _shape_mask

MIN_PIXELS = 6  # smaller components are specks, not objects
MAX_ALPHA = 1.5  # a model may draw a colour brighter than the palette's (saturated); the hue is what counts
MIN_ALPHA = 0.5  # a pixel is foreground from half the palette intensity up (the blurred edge's midpoint)
MAX_RESIDUAL = 75.0  # RGB distance from the nearest faded palette colour beyond which a pixel is no object's
MAX_MEAN_RESIDUAL = 40.0  # an object's pixels on average this close to its colour (noise sd 10 gives ~17)
BRIGHT = 60  # second pass, colour-agnostic: a pixel is bright when its largest channel exceeds this ...
MIN_BRIGHT_IOU = 0.75  # ... and a bright component no colour pass explained is an object only at this IoU
MIN_MEDIAN_ALPHA = 0.7  # an object is mostly at full intensity
MAX_RIM_ALPHA = 0.33  # and drops off sharply: a dark ring (renderer, mild blur+noise: <= 0.31; smooth noise: >= 0.34)
SURE_IOU = 0.85  # ... unless its shape is clean (heavy blur also softens the rim; smooth noise blobs: IoU <= 0.84)
MIN_IOU = 0.6  # best template IoU of a real object: ~1.0 clean, >= 0.8 under mild blur and noise
PEEL_PIXELS = 70  # components at least this large (about two small objects) are also tried as several
SEARCH = 2  # template offsets tried around the centroid, pixels each way
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)  # (K, 3)
_PALETTE_SQ = (_PALETTE**2).sum(axis=1)  # (K,)
_COLOR_NAMES = list(COLORS)


def template_mask(shape: str, n: int) -> np.ndarray:
    """The renderer's footprint of `shape` in an n x n box (`shapes._shape_mask` for odd n = 2 half + 1),
    extended to even n (centre between pixels), so that shapes drawn between the two sizes are matched too."""
    if n % 2:
        return _shape_mask(shape, n // 2)
    c = (n - 1) / 2
    yy, xx = np.mgrid[0:n, 0:n] - c
    if shape == "square":
        return np.ones((n, n), dtype=bool)
    if shape == "circle":
        return xx**2 + yy**2 <= (n / 2) ** 2
    return np.abs(xx) <= (yy + c) / 2 + 0.25


@functools.cache
def _templates() -> list[tuple[str, np.ndarray, float, float]]:
    """(shape, mask, centroid row, centroid col within the mask's box) for every shape and box size from 2 px
    below the small size to 2 px above the large one."""
    out = []
    lo, hi = 2 * min(SIZES.values()) + 1 - 2, 2 * max(SIZES.values()) + 1 + 2
    for shape in SHAPES:
        for n in range(lo, hi + 1):
            mask = template_mask(shape, n)
            rows, cols = np.nonzero(mask)
            out.append((shape, mask, float(rows.mean()), float(cols.mean())))
    return out


def _size(shape: str, area: int) -> str:
    """ "small" or "large": nearer (in log area) to the renderer's small or large footprint of the shape."""
    small, large = (int(_shape_mask(shape, SIZES[s]).sum()) for s in ("small", "large"))
    return "large" if area * area >= small * large else "small"


def _palette_fit(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: the nearest palette colour index, its intensity a_k and residual r_k (see the docstring)."""
    alpha = np.clip(img @ _PALETTE.T / _PALETTE_SQ, 0.0, MAX_ALPHA)  # (H, W, K)
    resid = np.linalg.norm(img[:, :, None, :] - alpha[..., None] * _PALETTE, axis=-1)  # (H, W, K)
    label = resid.argmin(axis=2)
    pick = label[..., None]
    return label, np.take_along_axis(alpha, pick, 2)[..., 0], np.take_along_axis(resid, pick, 2)[..., 0]


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


def _fit(mask: np.ndarray, area: int, cy: float, cx: float) -> tuple[float, str, int, int, np.ndarray | None]:
    """Best template for a component: (IoU, shape, box top row, box left col, template mask).

    `mask` is the component alone on a canvas padded by PAD on every side; the template's box is placed so its
    centroid lands within SEARCH pixels of the component's centroid (cy, cx in unpadded coordinates)."""
    best: tuple[float, str, int, int, np.ndarray | None] = (0.0, "", 0, 0, None)
    span = 2 * SEARCH + 1
    for shape, tmpl, ty, tx in _templates():
        n = tmpl.shape[0]
        y0, x0 = int(round(cy - ty)) - SEARCH + _PAD, int(round(cx - tx)) - SEARCH + _PAD
        windows = np.lib.stride_tricks.sliding_window_view(mask[y0 : y0 + n + span - 1, x0 : x0 + n + span - 1], (n, n))
        inter = (windows & tmpl).sum(axis=(2, 3))  # (span, span)
        iou = inter / (area + tmpl.sum() - inter)
        i, j = np.unravel_index(int(iou.argmax()), iou.shape)
        if iou[i, j] > best[0]:
            best = (float(iou[i, j]), shape, y0 + i - _PAD, x0 + j - _PAD, tmpl)
    return best


_PAD = 16  # canvas padding: the largest template (13 px) plus the search fits at any border


def _peel(mask: np.ndarray) -> list[np.ndarray]:
    """Split one component into touching objects of one colour: repeatedly take the template placement that the
    component covers best (at least 90%; the largest template among equals) and whose one-pixel outer ring is
    mostly outside the component (a wide patch of one colour, e.g. smooth noise, yields nothing). Returns the
    pixels (unpadded row, col) of each piece."""
    objects, rest = [], mask.copy()
    for _ in range(4):  # at most four objects in a scene
        best = None
        for _shape, tmpl, _ty, _tx in _templates():
            n, area = tmpl.shape[0], int(tmpl.sum())
            cover = (np.lib.stride_tricks.sliding_window_view(rest, (n, n)) & tmpl).sum(axis=(2, 3)) / area
            i, j = np.unravel_index(int(cover.argmax()), cover.shape)
            if cover[i, j] < 0.9 or (best is not None and (cover[i, j], area) <= best[0]):
                continue
            ring = np.pad(tmpl, 1)
            ring = _dilate(ring) & ~ring
            around = rest[i - 1 : i + n + 1, j - 1 : j + n + 1]
            if (around & ring).sum() <= 0.6 * ring.sum():
                best = ((cover[i, j], area), i, j, tmpl)
        if best is None:
            return objects
        _, i, j, tmpl = best
        piece = np.zeros_like(rest)
        n = tmpl.shape[0]
        piece[i : i + n, j : j + n] = rest[i : i + n, j : j + n] & tmpl
        objects.append(np.argwhere(piece) - _PAD)
        rest &= ~piece
        if rest.sum() < MIN_PIXELS:
            break
    return objects


def _peel_component(pixels: np.ndarray) -> list[tuple[np.ndarray, str, str]]:
    """The pieces of `_peel` that are objects by themselves (IoU >= MIN_IOU), with their shape and size."""
    canvas = np.zeros((32 + 2 * _PAD, 32 + 2 * _PAD), dtype=bool)
    canvas[pixels[:, 0] + _PAD, pixels[:, 1] + _PAD] = True
    out = []
    for piece in _peel(canvas):
        if len(piece) >= MIN_PIXELS:
            iou, shape, size = _classify(piece)
            if iou >= MIN_IOU:
                out.append((piece, shape, size))
    return out


def _union_iou(pixels: np.ndarray, pieces: list[tuple[np.ndarray, str, str]]) -> float:
    """IoU of a component with the union of its pieces' best templates."""
    comp = np.zeros((32 + 2 * _PAD, 32 + 2 * _PAD), dtype=bool)
    comp[pixels[:, 0] + _PAD, pixels[:, 1] + _PAD] = True
    union = np.zeros_like(comp)
    for piece, _, _ in pieces:
        canvas = np.zeros_like(comp)
        canvas[piece[:, 0] + _PAD, piece[:, 1] + _PAD] = True
        _, _, y0, x0, tmpl = _fit(canvas, len(piece), float(piece[:, 0].mean()), float(piece[:, 1].mean()))
        n = tmpl.shape[0]
        union[y0 + _PAD : y0 + _PAD + n, x0 + _PAD : x0 + _PAD + n] |= tmpl
    return float((comp & union).sum() / (comp | union).sum())


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def classify_shape(pixels: np.ndarray) -> str:
    """Shape of a set of (row, col) pixels by template IoU (the renderer's masks)."""
    return _classify(pixels)[1]


def _classify(pixels: np.ndarray) -> tuple[float, str, str]:
    canvas = np.zeros((32 + 2 * _PAD, 32 + 2 * _PAD), dtype=bool)
    canvas[pixels[:, 0] + _PAD, pixels[:, 1] + _PAD] = True
    iou, shape, _, _, _ = _fit(canvas, len(pixels), float(pixels[:, 0].mean()), float(pixels[:, 1].mean()))
    return iou, shape, _size(shape, len(pixels)) if shape else ""


def detect(image: np.ndarray) -> list[SceneObject]:
    """Objects in a (32, 32, 3) uint8 image (or float in [0, 255])."""
    img = np.asarray(image, dtype=np.float64)
    label, alpha, resid = _palette_fit(img)
    foreground = (alpha >= MIN_ALPHA) & (resid <= MAX_RESIDUAL)
    objects, claimed = [], np.zeros(foreground.shape, dtype=bool)
    bright = img.max(axis=2) > BRIGHT
    for k, color in enumerate(_COLOR_NAMES):
        for pixels in _components(foreground & (label == k)):
            if len(pixels) < MIN_PIXELS:
                continue
            rows, cols = pixels[:, 0], pixels[:, 1]
            if resid[rows, cols].mean() > MAX_MEAN_RESIDUAL or np.median(alpha[rows, cols]) < MIN_MEDIAN_ALPHA:
                continue  # not the flat palette colour of a drawn object
            iou, shape, size = _classify(pixels)
            if iou < SURE_IOU and _rim_intensity(img, k, pixels, _dilate((label != k) & bright)) > MAX_RIM_ALPHA:
                continue  # fades out slowly and is no clean shape: a patch of a smooth colour field
            parts = [(pixels, shape, size)] if iou >= MIN_IOU else []
            if len(pixels) >= PEEL_PIXELS and iou < 0.9:  # maybe touching objects of one colour
                pieces = _peel_component(pixels)
                if pieces and _union_iou(pixels, pieces) > max(iou, MIN_IOU) + 0.05:
                    parts = pieces
            for part, shape_name, size_name in parts:
                objects.append(
                    SceneObject(shape_name, color, size_name, float(part[:, 1].mean()), float(part[:, 0].mean()))
                )
                claimed[part[:, 0], part[:, 1]] = True
    # second pass: objects of an off-palette shade (a model's orange or lime splits between two palette colours)
    # or of a textured colour; only a clean template match counts, so noise stays out
    for pixels in _components(bright & ~_dilate(claimed)):
        if len(pixels) < 2 * MIN_PIXELS:
            continue
        if not _sharp(img.max(axis=2), pixels):
            continue
        iou, shape, size = _classify(pixels)
        if iou >= MIN_BRIGHT_IOU:
            k = _nearest_color(img[pixels[:, 0], pixels[:, 1]].mean(axis=0))
            objects.append(
                SceneObject(shape, _COLOR_NAMES[k], size, float(pixels[:, 1].mean()), float(pixels[:, 0].mean()))
            )
    return objects


def _rim_intensity(img: np.ndarray, k: int, pixels: np.ndarray, others: np.ndarray) -> float:
    """Mean intensity a_k of colour k on the one-pixel ring around a component, leaving out `others` (bright pixels
    of another colour and their neighbours: a touching object, or the blend between two colours, is not this
    one's rim); MAX_ALPHA when that leaves less than half the ring."""
    mask = np.zeros(img.shape[:2], dtype=bool)
    mask[pixels[:, 0], pixels[:, 1]] = True
    ring = _dilate(mask) & ~mask
    kept = ring & ~others
    if kept.sum() < 0.5 * ring.sum():
        return MAX_ALPHA  # mostly surrounded by other colours: no dark background around it, so no drawn object
    return float(np.clip(img[kept] @ _PALETTE[k] / _PALETTE_SQ[k], 0.0, MAX_ALPHA).mean())


def _sharp(value: np.ndarray, pixels: np.ndarray) -> bool:
    """A drawn object on the black background: bright inside (median of the largest channel >= 2.5 BRIGHT) and
    dark just outside (the one-pixel ring's mean <= BRIGHT / 2). A blob cut out of a smooth random field by the
    threshold fails: it fades to the threshold at its rim, and stays near it outside."""
    mask = np.zeros(value.shape, dtype=bool)
    mask[pixels[:, 0], pixels[:, 1]] = True
    ring = _dilate(mask) & ~mask
    return bool(ring.any() and np.median(value[mask]) >= 2.5 * BRIGHT and value[ring].mean() <= BRIGHT / 2)


def _nearest_color(rgb: np.ndarray) -> int:
    """Index of the palette colour whose faded / brightened copy is nearest to `rgb`."""
    alpha = np.clip(_PALETTE @ rgb / _PALETTE_SQ, 0.0, MAX_ALPHA)
    return int(np.linalg.norm(rgb[None, :] - alpha[:, None] * _PALETTE, axis=1).argmin())


MILD_BLUR_SIGMA = 0.7  # "mild" degradation, the judge's accuracy target: Gaussian blur up to this sigma (px) ...
MILD_NOISE_SD = 10.0  # ... then Gaussian pixel noise up to this standard deviation (0-255 scale)


def degrade(image: np.ndarray, blur_sigma: float, noise_sd: float, rng: np.random.Generator) -> np.ndarray:
    """`image` (H, W, 3) uint8 blurred by a Gaussian of `blur_sigma` px (separable, edges replicated), plus
    Gaussian noise of `noise_sd` (0-255 scale), rounded and clipped back to uint8: the judge's robustness tests."""
    x = np.asarray(image, dtype=np.float64)
    if blur_sigma > 0:
        r = max(1, int(np.ceil(3 * blur_sigma)))
        k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * blur_sigma**2))
        k /= k.sum()
        h, w = x.shape[:2]
        x = np.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
        x = sum(k[i] * x[i : i + h] for i in range(len(k)))
        x = sum(k[i] * x[:, i : i + w] for i in range(len(k)))
    if noise_sd > 0:
        x = x + rng.normal(0.0, noise_sd, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


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
