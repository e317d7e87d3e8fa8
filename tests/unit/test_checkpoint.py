"""Checkpoints hold student, EMA, fake score, optimizers, step and RNG: resume reproduces the next step exactly."""

import json

import pytest
import torch

from rcm_core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rcm_core.config import apply_overrides, toy2d_rcm, toy2d_scm
from rcm_core.data.toy2d import Toy2DTask
from rcm_core.distill import Distiller
from rcm_core.teacher import build_toy2d_net

TINY = ["model.hidden_dim=32", "model.num_layers=1", "train.batch_size=32", "loss.critic_ratio=2", "train.steps=10"]


def _distiller(preset=toy2d_rcm) -> Distiller:
    cfg = apply_overrides(preset(), TINY)
    task = Toy2DTask(cfg.data)
    torch.manual_seed(0)
    teacher = build_toy2d_net(cfg.model, task)
    return Distiller(cfg, teacher, task, parameterization="rf")


@pytest.mark.parametrize("preset", [toy2d_rcm, toy2d_scm])
def test_resume_reproduces_the_next_step_exactly(tmp_path, preset):
    a = _distiller(preset)
    for _ in range(3):
        a.train_step()
    path = save_checkpoint(a, tmp_path, a.step)
    expected = a.train_step()

    b = _distiller(preset)  # fresh weights, fresh RNG: everything must come from the checkpoint
    torch.manual_seed(123)
    manifest = load_checkpoint(b, path)
    assert manifest["step"] == 3 and b.step == 3
    got = b.train_step()
    for key in ("loss", "scm_loss", "dmd_loss", "fake_score_loss"):
        if key in expected:
            assert got[key] == expected[key], key
    for pa, pb in zip(a.student.parameters(), b.student.parameters(), strict=True):
        assert torch.equal(pa, pb)
    for pa, pb in zip(a.ema.model.parameters(), b.ema.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_checkpoint_holds_every_state(tmp_path):
    d = _distiller()
    d.train_step()
    state = d.state_dict()
    assert {"student", "ema", "opt", "fake", "fake_opt", "step", "generator", "torch_rng"} <= set(state)
    assert state["opt"]["state"], "optimizer moments are saved"


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    d = _distiller()
    save_checkpoint(d, tmp_path, 2)
    save_checkpoint(d, tmp_path, 10)
    half = tmp_path / "step-20"
    half.mkdir()  # an interrupted save: shards but no manifest
    (half / "__0_0.distcp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-10"
    assert json.loads((tmp_path / "step-10" / "manifest.json").read_text())["step"] == 10
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(d, half)
    assert latest_checkpoint(tmp_path / "missing") is None
