"""The shapes teacher: `rcm teacher train --preset shapes` trains, evaluates, saves (bf16) and reloads."""

import subprocess
import sys

import pytest
import torch

from rcm_core.data.shapes import eval_prompts
from rcm_core.shapes_teacher import ShapesTeacherConfig, evaluate_shapes, load_shapes_teacher

TINY = [
    "dim=32",
    "depth=1",
    "num_heads=2",
    "patch_size=4",
    "text_dim=16",
    "text_depth=1",
    "steps=3",
    "batch_size=4",
    "log_every=1",
    "sample_steps=2",
]


def test_cli_trains_saves_and_reloads_a_shapes_teacher(tmp_path):
    out = tmp_path / "shapes.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "rcm_core.cli",
        "teacher",
        "train",
        "--preset",
        "shapes",
        "--out",
        str(out),
        "--no-eval",
    ] + [a for kv in TINY for a in ("--set", kv)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "step       3/3" in res.stdout
    net, meta = load_shapes_teacher(out)
    assert meta["task"] == "shapes" and meta["config"]["depth"] == 1 and meta["training"]["final_loss"] > 0
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2, dtype=torch.float64)
    from rcm_core.data.shapes import ShapesTask

    assert torch.isfinite(net(x, t, ShapesTask().null_cond(2))).all()
    score = evaluate_shapes(net, samples_per_prompt=1, num_steps=2, guidance_scale=2.0, prompts=eval_prompts()[:6])
    assert 0.0 <= score["overall"] <= 1.0


def test_cli_rejects_bad_shapes_override(tmp_path):
    cmd = [sys.executable, "-m", "rcm_core.cli", "teacher", "train", "--preset", "shapes", "--set", "depht=3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert (
        res.returncode == 2
        and res.stderr.strip().splitlines() == [res.stderr.strip().splitlines()[0]]
        and "depht: unknown key" in res.stderr
    )


def test_default_preset_fits_the_shipping_budget():
    from rcm_core.data.shapes import ShapesTask
    from rcm_core.shapes_teacher import build_shapes_net

    n = sum(p.numel() for p in build_shapes_net(ShapesTeacherConfig(), ShapesTask()).parameters())
    assert n * 2 <= 25 * 2**20, n  # bf16 weights within 25 MB
    with pytest.raises(ValueError):
        ShapesTeacherConfig(caption_dropout=1.0)
