"""The moving-shapes clip judge (rcm_core.eval.clip_judge): agreement with the renderer's own clips (also under
mild blur and noise), shuffled captions, noise clips, flicker and wrong motion."""

import dataclasses

import numpy as np
import pytest

from rcm_core.data import moving_shapes as ms
from rcm_core.data.shapes import CATEGORIES, COLORS, render_scene
from rcm_core.eval.clip_judge import judge_clip, read_motion, score_clips, trajectory_diversity
from rcm_core.eval.geneval import MILD_BLUR_SIGMA, MILD_NOISE_SD, degrade


def _clips(n, seed):
    rng = np.random.default_rng(seed)
    prompts, clips, tracks = [], [], []
    for _ in range(n):
        p = ms.sample_prompt(rng, split="train" if rng.random() < 0.8 else "held_out")
        clip, tr = ms.render_clip(p, rng)
        prompts.append(p)
        clips.append(clip)
        tracks.append(tr)
    return prompts, clips, tracks


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "mild-blur-noise"])
def test_judge_agrees_with_the_renderer_on_its_clips(degraded):
    prompts, clips, _ = _clips(240, seed=1)
    if degraded:  # every frame: blur sigma 0.7 px, then noise sd 10 (0-255 scale)
        rng = np.random.default_rng(2)
        clips = [np.stack([degrade(f, MILD_BLUR_SIGMA, MILD_NOISE_SD, rng) for f in c]) for c in clips]
    result = score_clips(prompts, clips)
    assert result["overall"] >= 0.99 and min(result[c] for c in CATEGORIES) >= 0.98, result
    assert result["motion"] >= 0.99 and result["temporal"] >= 0.99, result


def test_shuffled_captions_mostly_fail():
    # measured: 5 of 240 clips (2.1%) satisfy another clip's caption (same base and motion by chance)
    prompts, clips, _ = _clips(240, seed=3)
    perm = np.random.default_rng(4).permutation(len(prompts))
    shuffled = [prompts[i] for i in perm]
    correct = np.mean([judge_clip(p, c)["correct"] for p, c in zip(shuffled, clips, strict=True)])
    same = np.mean([a == b for a, b in zip(shuffled, prompts, strict=True)])
    assert correct <= 0.05 + same, correct
    assert score_clips(shuffled, clips)["motion"] <= 0.3  # 9 motions: 1/9 by chance, more for "still"


def _to_uint8(x):
    return np.clip(np.round((np.clip(x, -1, 1) + 1) * 127.5), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["gaussian", "smooth", "frozen-gaussian"])
def test_noise_clips_score_near_zero(kind):
    rng = np.random.default_rng(5)
    prompts = ms.eval_prompts()[::4]

    def clip():
        if kind == "gaussian":  # what the samplers start from: N(0, 1) in [-1, 1] per pixel and frame
            return _to_uint8(rng.normal(0, 1, (ms.FRAMES, 32, 32, 3)))
        if kind == "smooth":  # a low-frequency colour field per frame
            return np.stack([degrade(_to_uint8(rng.normal(0, 1, (32, 32, 3))), 2.0, 0, rng) for _ in range(8)])
        return np.repeat(_to_uint8(rng.normal(0, 1, (1, 32, 32, 3))), ms.FRAMES, axis=0)  # one noise frame, held

    result = score_clips(prompts, [clip() for _ in prompts])
    assert result["overall"] <= 0.05 and result["motion"] <= 0.05, result


def test_a_flickering_clip_fails_temporal_consistency():
    prompts, clips, tracks = _clips(60, seed=6)
    rng = np.random.default_rng(7)
    for prompt, clip, tr in zip(prompts, clips, tracks, strict=True):
        assert judge_clip(prompt, clip)["correct"]
        f = int(rng.integers(1, ms.FRAMES))  # one frame after the first
        objects = [dataclasses.replace(o) for o in tr[f]]
        i = int(rng.integers(len(objects)))
        if rng.random() < 0.5:
            del objects[i]  # an object vanishes for one frame
        else:
            objects[i].color = next(c for c in COLORS if c != objects[i].color)  # recoloured for one frame
        flicker = clip.copy()
        flicker[f] = render_scene(objects)
        verdict = judge_clip(prompt, flicker)
        assert not verdict["temporal"] and not verdict["correct"], (prompt.caption(), f)


def test_a_clip_moving_the_wrong_way_or_speed_fails_motion():
    prompts, clips, _ = _clips(60, seed=8)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    checked = 0
    for prompt, clip in zip(prompts, clips, strict=True):
        wrong = []
        if prompt.motion == "still":
            wrong = [ms.MovingPrompt(prompt.base, "left", "slow")]
        else:
            wrong = [
                ms.MovingPrompt(prompt.base, opposite[prompt.motion], prompt.speed),
                ms.MovingPrompt(prompt.base, prompt.motion, "slow" if prompt.speed == "fast" else "fast"),
                ms.MovingPrompt(prompt.base, "still"),
            ]
        for w in wrong:
            verdict = judge_clip(w, clip)
            assert verdict["frame0"] and verdict["temporal"] and not verdict["motion"] and not verdict["correct"]
            checked += 1
    assert checked > 100


def test_motion_reading_thresholds():
    assert read_motion((0.1, -0.2)) == ("still", None)
    assert read_motion((-1.0, 0.1)) == ("left", "slow")
    assert read_motion((0.0, 2.0)) == ("down", "fast")
    assert read_motion((0.2, -1.6)) == ("up", "fast")
    assert read_motion((1.0, 1.0)) is None  # diagonal: no captioned motion
    assert read_motion((4.0, 0.0)) is None  # faster than "fast"


def test_trajectory_diversity_of_renderer_clips_and_of_a_collapsed_model():
    prompt = ms.parse_caption("a video of a circle moving right slowly")
    rng = np.random.default_rng(9)
    clips = [ms.render_clip(prompt, rng)[0] for _ in range(40)]
    data = trajectory_diversity(prompt, clips, seed=10)  # K = 40: seeds 0-3 gave 0.87-1.06
    assert data["diversity"] == pytest.approx(1.0, abs=0.25) and data["found_fraction"] == 1.0
    assert data["recall"] > 0.8
    collapsed = trajectory_diversity(prompt, [clips[0]] * 40, seed=10)
    assert collapsed["diversity"] == 0.0 and collapsed["recall"] < 0.3


def test_scores_are_the_same_when_judged_in_worker_processes():
    import multiprocessing

    prompts, clips, _ = _clips(70, seed=12)
    clips[3] = clips[3][::-1].copy()  # one clip played backwards: its motion is wrong
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        assert score_clips(prompts, clips, pool=pool) == score_clips(prompts, clips)
