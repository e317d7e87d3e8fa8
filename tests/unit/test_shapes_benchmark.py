"""The shapes text-to-image task: caption grammar, renderer/scorer agreement, diversity on known inputs."""

import numpy as np
import pytest

from rcm_core.data.shapes import (
    CATEGORIES,
    COLORS,
    SHAPES,
    Prompt,
    SceneObject,
    Tokenizer,
    all_prompts,
    eval_prompts,
    held_out_prompts,
    render,
    render_scene,
    sample_prompt,
)
from rcm_core.eval.diversity import diversity_report, improved_recall, mean_pairwise_distance
from rcm_core.eval.geneval import detect, judge, score


def test_grammar_covers_geneval_categories_with_expected_captions():
    assert Prompt("single_object", (("circle", None),)).caption() == "a photo of a circle"
    assert Prompt("colors", (("square", "red"),)).caption() == "a photo of a red square"
    assert Prompt("counting", (("triangle", None),), count=3).caption() == "a photo of three triangles"
    assert Prompt("two_object", (("circle", None), ("square", None))).caption() == "a photo of a circle and a square"
    pos = Prompt("position", (("circle", None), ("square", None)), relation="left of")
    assert pos.caption() == "a photo of a circle left of a square"
    attr = Prompt("color_attr", (("circle", "blue"), ("square", "yellow")))
    assert attr.caption() == "a photo of a blue circle and a yellow square"
    prompts = all_prompts()
    assert {p.category for p in prompts} == set(CATEGORIES)
    assert len({p.caption() for p in prompts}) == len(prompts)  # captions are unambiguous


def test_held_out_prompts_are_never_sampled_for_training():
    held = {p.caption() for p in held_out_prompts()}
    assert 0 < len(held) < len(all_prompts()) / 4
    assert {p.category for p in held_out_prompts()} == {"colors", "counting", "position", "color_attr"}
    assert {p.category for p in eval_prompts()} == set(CATEGORIES)
    rng = np.random.default_rng(0)
    train = {sample_prompt(rng).caption() for _ in range(3000)}
    assert not train & held
    assert {sample_prompt(rng, split="held_out").caption() for _ in range(300)} <= held


def test_rendering_is_deterministic_per_seed():
    p = Prompt("counting", (("circle", None),), count=4)
    a, _ = render(p, np.random.default_rng(5))
    b, _ = render(p, np.random.default_rng(5))
    c, _ = render(p, np.random.default_rng(6))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_scorer_agrees_with_the_renderer_on_99_percent_of_images():
    rng = np.random.default_rng(1)
    prompts, images, detected_ok = [], [], 0
    for _ in range(1200):
        prompt = sample_prompt(rng, split="train" if rng.random() < 0.8 else "held_out")
        image, objects = render(prompt, rng)
        prompts.append(prompt)
        images.append(image)
        found = detect(image)
        key = lambda o: (o.shape, o.color, o.size)  # noqa: E731
        detected_ok += sorted(map(key, found)) == sorted(map(key, objects))
    result = score(prompts, images)
    assert result["overall"] >= 0.99 and min(result[c] for c in CATEGORIES) >= 0.98, result
    assert detected_ok / len(images) >= 0.99  # shapes, colours and sizes read back exactly


def test_scorer_rejects_wrong_scenes():
    obj = lambda s, c, x, y: SceneObject(s, c, "large", x, y)  # noqa: E731
    image = render_scene([obj("circle", "red", 8, 16), obj("square", "blue", 24, 16)])
    found = detect(image)
    assert judge(Prompt("position", (("circle", None), ("square", None)), relation="left of"), found)
    assert not judge(Prompt("position", (("circle", None), ("square", None)), relation="right of"), found)
    assert not judge(Prompt("colors", (("circle", "blue"),)), found)
    assert not judge(Prompt("counting", (("circle", None),), count=2), found)
    assert not judge(Prompt("single_object", (("triangle", None),)), found)
    assert judge(Prompt("color_attr", (("circle", "red"), ("square", "blue"))), found)
    assert not judge(Prompt("color_attr", (("circle", "blue"), ("square", "red"))), found)
    assert detect(np.zeros((32, 32, 3), np.uint8)) == []


def test_diversity_metric_on_known_inputs():
    prompt = Prompt("single_object", (("circle", None),))
    rng = np.random.default_rng(3)
    data = [render(prompt, rng)[0] for _ in range(64)]
    as_data = diversity_report(prompt, data, seed=11)
    assert as_data["diversity"] == pytest.approx(1.0, abs=0.2) and as_data["recall"] > 0.8
    collapsed = diversity_report(prompt, [data[0]] * 64, seed=11)
    assert collapsed["diversity"] == 0.0 and collapsed["recall"] < 0.2
    blank = diversity_report(prompt, [np.zeros((32, 32, 3), np.uint8)] * 8, seed=11)
    assert blank == {"diversity": 0.0, "recall": 0.0, "found_fraction": 0.0}
    pts = np.array([[0.0, 0.0], [3.0, 4.0]])
    assert mean_pairwise_distance(pts) == 5.0
    assert improved_recall(pts, np.zeros((5, 2)), k=3) == 0.5


def test_tokenizer_masks_padding():
    tok = Tokenizer()
    ids, mask = tok.encode(["a photo of a red circle", "a photo of two squares", ""])
    assert ids.shape == (3, 12) and mask[0].sum() == 7 and mask[1].sum() == 6 and mask[2].sum() == 1
    assert (ids[:, 0] == 2).all() and (ids[~mask] == 0).all() and (ids[mask] > 1).all()
    assert len(tok) == 3 + len({w for p in all_prompts() for w in p.caption().split()})
    assert set(SHAPES) | set(COLORS) <= set(tok.vocab)


def test_shapes_task_batches_and_text_to_image_net():
    import torch

    from rcm_core.data.shapes import ShapesTask, to_uint8
    from rcm_core.models.dit import DiTConfig
    from rcm_core.models.text import TextEncoderConfig, TextToImageNet

    task = ShapesTask()
    x0, cond = task.sample(4, generator=torch.Generator().manual_seed(0))
    again, _ = task.sample(4, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (4, 3, 32, 32) and torch.equal(x0, again) and x0.min() >= -1 and x0.max() <= 1
    images = to_uint8(x0)
    assert images.shape == (4, 32, 32, 3) and all(detect(img) for img in images)  # round trip keeps objects
    null = task.null_cond(4)
    assert null["mask"].sum(1).tolist() == [1, 1, 1, 1]
    dit = DiTConfig(image_size=32, patch_size=4, dim=64, depth=2, num_heads=2, cond_dim=32)
    net = TextToImageNet(dit, TextEncoderConfig(vocab_size=len(task.tokenizer), dim=32, depth=1, num_heads=2))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    t = torch.rand(4, dtype=torch.float64)
    out, tangent = torch.func.jvp(lambda x, tt: net(x, tt, cond), (x0, t), (torch.randn_like(x0), torch.ones_like(t)))
    assert out.shape == x0.shape and torch.isfinite(tangent).all() and tangent.abs().sum() > 0
    assert torch.isfinite(net(x0, t, null)).all()
