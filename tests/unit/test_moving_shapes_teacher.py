"""The moving-shapes teacher on the CPU with a tiny config: trains a few steps, saves a diffusers folder that the
`diffusers` task's loader reads back unchanged, records how it was made, and samples clips."""

import json

import numpy as np
import pytest
import torch

from rcm_core.cli import main
from rcm_core.data import moving_shapes as ms
from rcm_core.moving_shapes_teacher import (
    METADATA,
    MovingShapesTeacherConfig,
    load_moving_shapes_teacher,
    sample_clips,
    save_moving_shapes_teacher,
    shifted_times,
    train_moving_shapes_teacher,
)
from rcm_core.teachers import load_diffusers_teacher

TINY = dict(
    num_layers=1,
    num_attention_heads=2,
    attention_head_dim=16,
    ffn_dim=32,
    freq_dim=32,
    text_dim=16,
    steps=3,
    batch_size=4,
    log_every=1,
    pool_size=8,
    sample_steps=2,
    guidance_scale=2.0,
)


def test_time_shift_is_diffusers_flow_match_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.linspace(1.0, 0.001, 1000, dtype=torch.float64)  # the scheduler's unshifted training sigmas
    assert torch.allclose(shifted_times(u, 3.0).float(), sched.sigmas.float(), atol=1e-6)
    assert torch.equal(shifted_times(u, 1.0), u)


def test_tiny_teacher_trains_saves_in_diffusers_format_and_loads_back(tmp_path):
    cfg = MovingShapesTeacherConfig(**TINY)
    net, record = train_moving_shapes_teacher(cfg)
    assert record["steps_done"] == 3 and np.isfinite(record["final_loss"]) and len(record["loss_curve"]) == 3
    assert any(p.abs().sum() > 0 for p in net.proj_out.parameters())  # the zero-initialised head was trained
    folder = save_moving_shapes_teacher(net, tmp_path / "teacher", cfg, record)
    meta = json.loads((folder / METADATA).read_text())
    assert meta["default_sampler"]["steps"] == 2 and meta["default_sampler"]["guidance_scale"] == 2.0
    assert meta["training"]["steps_done"] == 3 and meta["text_encoder"]["dim"] == 16
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["in_channels"] == config["out_channels"] == 3
    assert "Wan2.1" in (folder / "README.md").read_text()

    loaded, encoder, _ = load_moving_shapes_teacher(folder)
    cond = encoder.cond(["a video of a red circle and a blue square moving up fast", ""])
    x = torch.randn(2, 3, ms.FRAMES, 32, 32)
    s = torch.tensor([0.3, 0.8], dtype=torch.float64)
    # the saved weights are bf16: compare with the trained net rounded the same way
    rounded = {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    keep = {
        k
        for k in rounded
        if any(m in k.split(".") for m in ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"))
    }
    net.load_state_dict({k: (net.state_dict()[k] if k in keep else v) for k, v in rounded.items()})
    with torch.no_grad():
        assert torch.allclose(loaded(x, s, cond), net(x, s, cond), atol=1e-5)
    # the diffusers task's own loader reads the folder as a wan2.1 teacher
    flow = load_diffusers_teacher(folder)
    assert flow.net.patch_size == (1, 4, 4)

    clips = sample_clips(loaded, encoder, ["a video of a circle that stays still"] * 3, steps=2, guidance_scale=2.0)
    assert clips.shape == (3, ms.FRAMES, 32, 32, 3) and clips.dtype == np.uint8


def test_cli_trains_a_tiny_teacher_and_rejects_a_bad_config(tmp_path, capsys):
    args = ["teacher", "train", "--preset", "moving-shapes", "--out", str(tmp_path / "t"), "--no-eval"]
    sets = [a for k, v in {**TINY, "pool_size": 0, "steps": 2}.items() for a in ("--set", f"{k}={v}")]
    assert main(args + sets) == 0
    assert (tmp_path / "t" / "diffusion_pytorch_model.safetensors").is_file()
    assert main(args + ["--set", "patch_size=[1, 3, 3]"]) == 2
    err = capsys.readouterr().err
    assert "patch_size" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="caption_dropout"):
        MovingShapesTeacherConfig(caption_dropout=1.0)


@pytest.mark.parametrize("pool_size", [0, 40])
def test_training_batches_pair_each_clip_with_its_own_caption(pool_size):
    from rcm_core.eval.geneval import detect, judge
    from rcm_core.moving_shapes_teacher import ClipSource

    source = ClipSource(MovingShapesTeacherConfig(**{**TINY, "pool_size": pool_size}), torch.device("cpu"))
    x0, ids = source.sample(24, torch.Generator().manual_seed(0))
    assert x0.shape == (24, 3, ms.FRAMES, 32, 32) and x0.min() >= -1 and x0.max() <= 1
    clips = ms.to_uint8_clips(x0)
    prompts = [source.prompts[i] for i in ids.tolist()]
    assert not any(p.is_held_out() for p in prompts)
    # clean renders: frame 0 satisfies the paired caption's base prompt (a shuffled pairing would mostly fail)
    assert all(judge(p.base, detect(c[0])) for p, c in zip(prompts, clips, strict=True))
