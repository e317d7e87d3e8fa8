"""A deterministic judge for moving-shapes clips (rcm_core.data.moving_shapes): does a clip show its caption?

Per frame, the shapes detector (rcm_core.eval.geneval.detect). Per clip:

- tracking: frame 0's objects are followed frame by frame, each to the nearest detection of the same colour
  and shape within MAX_STEP_PX (objects are at least ~11 px apart and move at most 2 px a frame, so the
  nearest is unambiguous);
- temporal consistency (`temporal`): at least one object, the same number of detections in every frame and
  every frame-0 object tracked through every frame (a frame where an object vanishes, is recoloured or changes
  shape, i.e. flicker, fails);
- motion (`motion`): the velocity of each track is the least-squares slope of its centroid over the frames;
  the clip's velocity is the mean over tracks (every track within MAX_SPREAD_PX_PER_FRAME of it). It reads as
  "still" below STILL_PX_PER_FRAME, else as the dominant axis' direction (the cross axis must stay below
  STILL_PX_PER_FRAME) at "slow" (renderer: 1 px/frame) below FAST_PX_PER_FRAME or "fast" (2 px/frame) up to
  MAX_PX_PER_FRAME; the reading must equal the caption's motion and speed (and needs a temporally
  consistent clip: a motion is only defined for objects that persist);
- the base prompt (object, count, colour, position, colour binding) is judged on frame 0 with GenEval's rules
  (geneval.judge), as the grammar states the position relation at frame 0.

Scores (`score_clips`): per base category, the fraction of clips that are fully correct (frame-0 prompt and
motion and temporal consistency); `overall` the mean over the categories present (GenEval's category mean);
`motion` and `temporal` the fraction of all clips passing each check alone; `frame0` the category mean of the
frame-0 prompt alone (the image-only score). Diversity (`trajectory_diversity`): for K clips of one prompt,
the mean pairwise distance of the first named object's (start, end) centroids, relative to the same for K
clips from the renderer (1.0 = as spread out as the data).
"""

from __future__ import annotations

import numpy as np

from rcm_core.data.moving_shapes import MovingPrompt, render_clip
from rcm_core.data.shapes import CATEGORIES, IMAGE_SIZE, SceneObject
from rcm_core.eval.diversity import improved_recall, mean_pairwise_distance
from rcm_core.eval.geneval import _matches, detect, judge

MAX_STEP_PX = 4.0  # a tracked object moves at most this far between frames (fast = 2 px, plus centroid jitter)
STILL_PX_PER_FRAME = 0.5  # below: no motion on that axis
FAST_PX_PER_FRAME = 1.5  # slow (1 px/frame) below, fast (2 px/frame) from here
MAX_PX_PER_FRAME = 2.75  # faster than any captioned speed
MAX_SPREAD_PX_PER_FRAME = 0.5  # every object moves with the group (one motion phrase per caption)


def track(frames: list[list[SceneObject]]) -> list[list[SceneObject]] | None:
    """Tracks of frame 0's objects through every frame (tracks[i][f]), or None if one is lost in some frame."""
    tracks = [[o] for o in frames[0]]
    for objects in frames[1:]:
        free = list(objects)
        # match the closest (track, detection) pairs first, so two nearby same-looking objects cannot swap
        pairs = sorted(
            (np.hypot(o.cx - t[-1].cx, o.cy - t[-1].cy), i, j)
            for i, t in enumerate(tracks)
            for j, o in enumerate(free)
            if _matches(o, t[-1].shape, t[-1].color)
        )
        taken_t, taken_d = set(), set()
        for dist, i, j in pairs:
            if dist > MAX_STEP_PX or i in taken_t or j in taken_d:
                continue
            tracks[i].append(free[j])
            taken_t.add(i)
            taken_d.add(j)
        if len(taken_t) < len(tracks):
            return None
    return tracks


def velocity(tracks: list[list[SceneObject]]) -> tuple[float, float] | None:
    """The group's (vx, vy) in px/frame (least-squares slope per track, averaged), None if objects disagree."""
    f = np.arange(len(tracks[0]), dtype=np.float64)
    f -= f.mean()
    slopes = np.array([[(f * [o.cx for o in t]).sum(), (f * [o.cy for o in t]).sum()] for t in tracks]) / (f**2).sum()
    mean = slopes.mean(axis=0)
    if np.abs(slopes - mean).max() > MAX_SPREAD_PX_PER_FRAME:
        return None
    return float(mean[0]), float(mean[1])


def read_motion(v: tuple[float, float]) -> tuple[str, str | None] | None:
    """(motion, speed) that a velocity reads as, e.g. ("left", "fast") or ("still", None); None if none fits."""
    vx, vy = v
    if max(abs(vx), abs(vy)) < STILL_PX_PER_FRAME:
        return "still", None
    along, cross = (vx, vy) if abs(vx) >= abs(vy) else (vy, vx)
    if abs(cross) >= STILL_PX_PER_FRAME or abs(along) > MAX_PX_PER_FRAME:
        return None
    direction = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
    return direction, ("fast" if abs(along) >= FAST_PX_PER_FRAME else "slow")


def judge_clip(prompt: MovingPrompt, clip: np.ndarray) -> dict[str, bool]:
    """Checks of one (F, 32, 32, 3) uint8 clip against its caption: frame0, temporal, motion and correct (all)."""
    frames = [detect(frame) for frame in clip]
    frame0 = judge(prompt.base, frames[0])
    tracks = track(frames) if frames[0] else None
    temporal = tracks is not None and all(len(objs) == len(frames[0]) for objs in frames)
    v = velocity(tracks) if temporal and tracks else None
    motion = v is not None and read_motion(v) == (prompt.motion, prompt.speed)
    return {"frame0": frame0, "temporal": temporal, "motion": motion, "correct": frame0 and temporal and motion}


def _judge_pair(args: tuple[MovingPrompt, np.ndarray]) -> dict[str, bool]:
    return judge_clip(*args)


def score_clips(prompts: list[MovingPrompt], clips, *, pool=None) -> dict[str, float]:
    """overall / per base category (fully correct clips), motion, temporal, frame0 (see the module docstring).

    `pool`: a multiprocessing pool to judge the clips in (about 10 ms a clip on one core), or None."""
    pairs = list(zip(prompts, clips, strict=True))
    if pool is not None and len(pairs) >= 64:
        results = pool.map(_judge_pair, pairs, chunksize=32)
    else:
        results = [judge_clip(p, c) for p, c in pairs]
    correct: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    first: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    for p, r in zip(prompts, results, strict=True):
        correct[p.category].append(r["correct"])
        first[p.category].append(r["frame0"])
    per_cat = {c: float(np.mean(v)) for c, v in correct.items() if v}
    return {
        "overall": float(np.mean(list(per_cat.values()))),
        **per_cat,
        "motion": float(np.mean([r["motion"] for r in results])),
        "temporal": float(np.mean([r["temporal"] for r in results])),
        "frame0": float(np.mean([np.mean(v) for v in first.values() if v])),
    }


def trajectory_features(prompt: MovingPrompt, clips) -> np.ndarray:
    """(M, 4): (x, y) / 32 of the prompt's first named object at the first and the last frame, for the clips
    where it is found in both (the first matching detection; M <= len(clips))."""
    shape, color = prompt.base.objects[0]
    rows = []
    for clip in clips:
        ends = [[o for o in detect(clip[f]) if _matches(o, shape, color)] for f in (0, len(clip) - 1)]
        if ends[0] and ends[1]:
            a = ends[0][0]
            b = min(ends[1], key=lambda o: np.hypot(o.cx - a.cx, o.cy - a.cy))  # the same object, moved
            rows.append([a.cx, a.cy, b.cx, b.cy])
    return np.array(rows, dtype=np.float64).reshape(-1, 4) / IMAGE_SIZE


def trajectory_diversity(prompt: MovingPrompt, clips, *, seed: int = 0) -> dict[str, float]:
    """diversity (mean pairwise trajectory distance relative to K renderer clips of the prompt), recall
    (improved recall, k = 3, of the renderer's trajectories) and the fraction of clips where the object was found."""
    rng = np.random.default_rng(seed)
    real = trajectory_features(prompt, [render_clip(prompt, rng)[0] for _ in range(len(clips))])
    fake = trajectory_features(prompt, clips)
    base = mean_pairwise_distance(real)
    return {
        "diversity": mean_pairwise_distance(fake) / base if base > 0 else 0.0,
        "recall": improved_recall(real, fake),
        "found_fraction": len(fake) / max(len(clips), 1),
    }
