"""The shapes judge (rcm_core.eval.geneval) against the faults an independent judge found in the first version:
touching objects of different colours merged into one, circles and squares confused under mild blur and noise,
and noise images passing (a noise student scored 0.248 overall). Each test failed on that version."""

import itertools

import numpy as np
import pytest

from rcm_core.data.shapes import (
    CATEGORIES,
    COLORS,
    SHAPES,
    SIZES,
    SceneObject,
    all_prompts,
    render,
    render_scene,
    sample_prompt,
)
from rcm_core.eval.geneval import MILD_BLUR_SIGMA, MILD_NOISE_SD, degrade, detect, score


def _key(o):
    return (o.shape, o.color, o.size)


def test_judge_agrees_with_the_renderer_under_mild_blur_and_noise():
    # the worst "mild" case on every image: blur sigma 0.7 px, then noise sd 10 (0-255 scale); the first judge
    # scored 0.62 here (circles read as squares once noise widened the bright area, blurred edges dropped)
    rng = np.random.default_rng(7)
    prompts, images, exact = [], [], 0
    for _ in range(600):
        prompt = sample_prompt(rng, split="train" if rng.random() < 0.8 else "held_out")
        image, objects = render(prompt, rng)
        image = degrade(image, MILD_BLUR_SIGMA, MILD_NOISE_SD, rng)
        prompts.append(prompt)
        images.append(image)
        exact += sorted(map(_key, detect(image))) == sorted(map(_key, objects))
    result = score(prompts, images)
    assert result["overall"] >= 0.99 and min(result[c] for c in CATEGORIES) >= 0.98, result
    assert exact / len(images) >= 0.99  # shape, colour and size of every object read back


def _touching_pair(s0, c0, z0, s1, c1, z1, horizontal):
    """Two objects whose boxes share an edge (no gap): the widest rows/columns of the shapes touch."""
    gap = SIZES[z0] + SIZES[z1] + 1
    a = SceneObject(s0, c0, z0, 9, 16) if horizontal else SceneObject(s0, c0, z0, 16, 9)
    b = SceneObject(s1, c1, z1, 9 + gap, 16) if horizontal else SceneObject(s1, c1, z1, 16, 9 + gap)
    return a, b


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "mild-blur-noise"])
def test_touching_objects_of_different_colours_are_two_objects(degraded):
    rng = np.random.default_rng(3)
    wrong = []
    for s0, s1, (c0, c1), (z0, z1), horizontal in itertools.product(
        SHAPES, SHAPES, itertools.permutations(COLORS, 2), itertools.product(SIZES, SIZES), (True, False)
    ):
        a, b = _touching_pair(s0, c0, z0, s1, c1, z1, horizontal)
        image = render_scene([a, b])
        if degraded:
            image = degrade(image, MILD_BLUR_SIGMA, MILD_NOISE_SD, rng)
        found = detect(image)
        if sorted(map(_key, found)) != sorted(map(_key, [a, b])):
            wrong.append((_key(a), _key(b), horizontal, [_key(o) for o in found]))
        else:  # and each where it is drawn (a triangle's centroid sits below its box centre)
            for drawn in (a, b):
                seen = next(o for o in found if o.color == drawn.color)
                assert abs(seen.cx - drawn.cx) <= 1 and abs(seen.cy - drawn.cy) <= 2.5, (seen, drawn)
    assert not wrong, f"{len(wrong)} of 864 touching pairs misread, e.g. {wrong[:3]}"


def test_touching_objects_of_one_colour_are_mostly_split():
    # harder (no colour edge): the component is split into the renderer's templates; sizes of blurred
    # triangles next to another object are the main remaining error
    rng = np.random.default_rng(4)
    ok = total = 0
    for s0, s1, c, (z0, z1), horizontal, degraded in itertools.product(
        SHAPES, SHAPES, ("blue",), itertools.product(SIZES, SIZES), (True, False), (False, True)
    ):
        a, b = _touching_pair(s0, c, z0, s1, c, z1, horizontal)
        image = render_scene([a, b])
        if degraded:
            image = degrade(image, MILD_BLUR_SIGMA, MILD_NOISE_SD, rng)
        total += 1
        ok += sorted(map(_key, detect(image))) == sorted(map(_key, [a, b]))
    assert ok / total >= 0.9, f"{ok}/{total}"


def _to_uint8(x):
    """A [-1, 1] float image -> uint8, as rcm_core.data.shapes.to_uint8 maps a model's output."""
    return np.clip(np.round((np.clip(x, -1, 1) + 1) * 127.5), 0, 255).astype(np.uint8)


def _smooth(rng, sigma, mean=0.0, sd=1.0):
    field = rng.normal(0.0, 1.0, (32, 32, 3))
    r = int(np.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()
    padded = np.pad(field, ((r, r), (r, r), (0, 0)), mode="wrap")
    field = sum(k[i] * padded[i : i + 32] for i in range(len(k)))
    field = sum(k[i] * field[:, i : i + 32] for i in range(len(k)))
    return _to_uint8(mean + sd * field / field.std())


NOISE = {
    # what every sampler starts from (N(0, 1) in [-1, 1]), i.e. a student that returns its input
    "gaussian": lambda rng: _to_uint8(rng.normal(0.0, 1.0, (32, 32, 3))),
    "gaussian-dark": lambda rng: _to_uint8(rng.normal(-0.7, 0.6, (32, 32, 3))),
    "uniform": lambda rng: rng.integers(0, 256, (32, 32, 3)).astype(np.uint8),
    # low-frequency colour fields: blobs of smoothly varying colour
    "smooth-1px": lambda rng: _smooth(rng, 1.0),
    "smooth-2px": lambda rng: _smooth(rng, 2.0),
    "smooth-4px": lambda rng: _smooth(rng, 4.0),
    "smooth-2px-dark": lambda rng: _smooth(rng, 2.0, mean=-0.8, sd=0.9),
    # exact palette colours scattered on black: right colours, no shapes
    "palette-confetti": lambda rng: (
        np.array(list(COLORS.values()))[rng.integers(0, 4, (32, 32))] * (rng.random((32, 32, 1)) < 0.4)
    ).astype(np.uint8),
}


@pytest.mark.parametrize("kind", list(NOISE))
def test_noise_images_score_near_zero(kind):
    rng = np.random.default_rng(11)
    prompts = all_prompts()  # every prompt once: every category
    result = score(prompts, [NOISE[kind](rng) for _ in prompts])
    assert result["overall"] <= 0.05, result
