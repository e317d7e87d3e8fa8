"""A procedural text-to-video task: 8-frame 32x32 RGB clips of 1-4 shapes that move together, with captions
that extend the shapes grammar (rcm_core/data/shapes.py) with one motion phrase per clip.

A `MovingPrompt` is a shapes `Prompt` (what frame 0 shows: object, colour, count, position, colour binding)
plus a motion: a direction ("left", "right", "up", "down") and a speed ("slow" = 1, "fast" = 2 pixels per
frame), or "still". Every object of a clip moves the same way, so the frame-0 relations (position, no
overlap) hold in every frame. The renderer lays out frame 0 with the shapes renderer, then shifts the whole
group so its track stays fully inside the frame; everything is deterministic given a numpy Generator.

Not every (base, motion, speed) combination fits a 32-pixel frame: a displacement of 14 pixels (fast over 8
frames) leaves no room for three or more objects (each pair needs an 11-pixel gap on some axis) nor for a
position relation along the motion axis. Those combinations are not in the grammar (`all_prompts` omits
them, `parse_caption` rejects them).

Held-out split: every combination whose base prompt is held out by the shapes grammar (unseen base prompts),
plus, per category, the 1/8 of the remaining combinations with the smallest caption hash (unseen
base x motion pairs; their base and their motion both occur in training with other partners).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from rcm_core.data import shapes
from rcm_core.data.shapes import CATEGORIES, COUNT_WORDS, IMAGE_SIZE, SIZES, Prompt, SceneObject

FRAMES = 8
MOTIONS = ("left", "right", "up", "down", "still")
SPEEDS = {"slow": 1, "fast": 2}  # pixels per frame
SPEED_WORDS = {"slow": "slowly", "fast": "fast"}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy); rows grow downwards
RENDERER_VERSION = "moving-shapes-v1"  # bump when a clip for a given (prompt, rng) changes
HELD_OUT_BUCKETS = shapes.HELD_OUT_BUCKETS
# The shapes renderer keeps every box inside pixels [1, IMAGE_SIZE - 2]; tracks keep the same margin.
_PIX_LO, _PIX_HI = 1, IMAGE_SIZE - 2
_MAX_LAYOUTS = 5000  # rejection budget per clip; the tightest grammar combination succeeds ~1 in 100


@dataclass(frozen=True)
class MovingPrompt:
    """A clip's meaning: frame 0 as a shapes `Prompt`, then one shared motion (speed None iff "still")."""

    base: Prompt
    motion: str
    speed: str | None = None

    def __post_init__(self):
        if self.motion not in MOTIONS:
            raise ValueError(f"motion {self.motion!r} is not one of {MOTIONS}")
        if (self.motion == "still") != (self.speed is None):
            raise ValueError(f"motion {self.motion!r} needs speed {'None' if self.motion == 'still' else 'slow|fast'}")
        if self.speed is not None and self.speed not in SPEEDS:
            raise ValueError(f"speed {self.speed!r} is not one of {tuple(SPEEDS)}")

    @property
    def category(self) -> str:
        return self.base.category

    @property
    def num_objects(self) -> int:
        return self.base.count if self.base.category == "counting" else len(self.base.objects)

    @property
    def velocity(self) -> tuple[int, int]:
        """(dx, dy) in pixels per frame."""
        if self.motion == "still":
            return (0, 0)
        dx, dy = DIRECTIONS[self.motion]
        step = SPEEDS[self.speed or ""]
        return (dx * step, dy * step)

    def caption(self) -> str:
        subject = self.base.caption().removeprefix("a photo of ")
        if self.motion == "still":
            return f"a video of {subject} that {'stays' if self.num_objects == 1 else 'stay'} still"
        return f"a video of {subject} moving {self.motion} {SPEED_WORDS[self.speed or '']}"

    def is_held_out(self) -> bool:
        return self.caption() in _held_out_captions()


def _fits(base: Prompt, motion: str, speed: str | None) -> bool:
    """Can the combination be rendered with the whole track inside the frame? (see the module docstring)"""
    if speed != "fast":
        return True
    if base.category == "counting" and base.count >= 3:
        return False
    if base.category == "position":
        horizontal_relation = base.relation in ("left of", "right of")
        return horizontal_relation != (motion in ("left", "right"))
    return True


def _motions() -> list[tuple[str, str | None]]:
    return [(m, s) for m in MOTIONS if m != "still" for s in SPEEDS] + [("still", None)]


def all_prompts() -> list[MovingPrompt]:
    """Every prompt of the grammar (about a thousand), in a fixed order."""
    return [MovingPrompt(b, m, s) for b in shapes.all_prompts() for m, s in _motions() if _fits(b, m, s)]


@functools.cache
def _held_out_captions() -> frozenset[str]:
    held = {p.caption() for p in all_prompts() if p.base.is_held_out()}
    for category in CATEGORIES:
        captions = sorted(
            (p.caption() for p in all_prompts() if p.category == category and not p.base.is_held_out()),
            key=lambda c: hashlib.sha256(c.encode()).hexdigest(),
        )
        held |= set(captions[: len(captions) // HELD_OUT_BUCKETS])
    return frozenset(held)


def held_out_prompts() -> list[MovingPrompt]:
    """Never drawn for training: unseen base prompts (any motion) and unseen base x motion pairs."""
    return [p for p in all_prompts() if p.is_held_out()]


def eval_prompts() -> list[MovingPrompt]:
    """The evaluation set: every held-out prompt, plus the single- and two-object training prompts (the shapes
    grammar holds none of those bases out)."""
    return held_out_prompts() + [
        p for p in all_prompts() if p.category in ("single_object", "two_object") and not p.is_held_out()
    ]


def sample_prompt(rng: np.random.Generator, split: str = "train") -> MovingPrompt:
    """A prompt from the grammar; `train` never returns a held-out prompt, `held_out` only those."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', not {split!r}")
    while True:
        base = shapes._draw_prompt(rng)
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        speed = None if motion == "still" else list(SPEEDS)[int(rng.integers(len(SPEEDS)))]
        if not _fits(base, motion, speed):
            continue
        prompt = MovingPrompt(base, motion, speed)
        if prompt.is_held_out() == (split == "held_out"):
            return prompt


@functools.cache
def _prompts_by_caption() -> dict[str, MovingPrompt]:
    return {p.caption(): p for p in all_prompts()}


def parse_caption(caption: str) -> MovingPrompt:
    """The MovingPrompt whose caption is `caption` (case and surrounding spaces ignored); ValueError if none."""
    key = " ".join(str(caption).lower().split())
    prompt = _prompts_by_caption().get(key)
    if prompt is None:
        raise ValueError(
            f"not a caption of the moving-shapes grammar: {str(caption).strip()!r} "
            f"(e.g. {all_prompts()[0].caption()!r})"
        )
    return prompt


def load_prompt_file(path) -> list[MovingPrompt]:
    """Prompts from a UTF-8 text file, one caption per line (the shapes loader's rules, this grammar's parser).

    Raises ValueError naming the file and line of the first caption the grammar cannot parse, or if the file
    holds no caption at all.
    """
    return shapes.load_prompt_file(path, parse=parse_caption)


# ----------------------------------------------------------------------------------------------- rendering


def _shift_range(objects: list[SceneObject], axis: int, displacement: int) -> tuple[int, int] | None:
    """Offsets t along `axis` (0 = x, 1 = y) such that the group, shifted by t at frame 0 and then moved by
    `displacement` pixels in total, stays inside [_PIX_LO, _PIX_HI] in every frame; None if no offset fits."""
    lo = min((o.cx, o.cy)[axis] - SIZES[o.size] for o in objects)
    hi = max((o.cx, o.cy)[axis] + SIZES[o.size] for o in objects)
    t_lo = _PIX_LO - lo - min(displacement, 0)
    t_hi = _PIX_HI - hi - max(displacement, 0)
    return (int(t_lo), int(t_hi)) if t_lo <= t_hi else None


def render_clip(prompt: MovingPrompt, rng: np.random.Generator) -> tuple[np.ndarray, list[list[SceneObject]]]:
    """(FRAMES, 32, 32, 3) uint8 clip and per-frame tracks satisfying `prompt`.

    Frame 0 is a shapes layout of the base prompt (rejected and redrawn until its track fits), shifted as a
    whole along the motion axis to a uniformly drawn start that keeps every frame inside; objects then move
    by the prompt's velocity each frame. tracks[f][i] is object i at frame f (same order every frame).
    """
    dx, dy = prompt.velocity
    axis = 0 if dx else 1
    displacement = (dx or dy) * (FRAMES - 1)
    for _ in range(_MAX_LAYOUTS):
        objects = shapes._layout(prompt.base, rng)
        if objects is None:
            continue
        if displacement:
            span = _shift_range(objects, axis, displacement)
            if span is None:
                continue
            t = int(rng.integers(span[0], span[1] + 1))
            sx, sy = (t, 0) if axis == 0 else (0, t)
            objects = [dataclasses.replace(o, cx=o.cx + sx, cy=o.cy + sy, extra={}) for o in objects]
        tracks = [
            [dataclasses.replace(o, cx=o.cx + f * dx, cy=o.cy + f * dy, extra={}) for o in objects]
            for f in range(FRAMES)
        ]
        clip = np.stack([shapes.render_scene(frame) for frame in tracks])
        return clip, tracks
    raise RuntimeError(f"could not lay out {prompt.caption()!r}")  # internal: every grammar prompt fits


def to_model_layout(clips: np.ndarray) -> np.ndarray:
    """(B, F, H, W, 3) uint8 clips -> (B, 3, F, H, W) float32 in [-1, 1] (Wan's (C, F, H, W) convention)."""
    return np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3), dtype=np.float32) / 127.5 - 1.0


def to_uint8_clips(x) -> np.ndarray:
    """(B, 3, F, H, W) model output in [-1, 1] (torch or numpy) -> (B, F, H, W, 3) uint8 clips for the judge."""
    arr = x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    return np.round((np.clip(arr, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 4, 1)


__all__ = [
    "COUNT_WORDS",
    "DIRECTIONS",
    "FRAMES",
    "IMAGE_SIZE",
    "MOTIONS",
    "RENDERER_VERSION",
    "SPEEDS",
    "MovingPrompt",
    "all_prompts",
    "eval_prompts",
    "held_out_prompts",
    "load_prompt_file",
    "parse_caption",
    "render_clip",
    "sample_prompt",
    "to_model_layout",
    "to_uint8_clips",
]
