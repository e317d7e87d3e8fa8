"""rcm_core.trainer.Trainer: the one loop. Checkpoint cadence, exact resume, cancel and time budget, and the
non-finite guard: a NaN/inf loss or gradient norm stops the run with the step and the terms, and no checkpoint
of it is written, so the last finite checkpoint is what stays."""

import math

import pytest
import torch

from rcm_core.checkpoint import DirectoryStore, latest_checkpoint, load_checkpoint
from rcm_core.config import apply_overrides, toy2d_rcm
from rcm_core.data.toy2d import Toy2DTask
from rcm_core.distill import Distiller
from rcm_core.teacher import build_toy2d_net
from rcm_core.trainer import NonFiniteError, Trainer, TrainHooks, check_finite_state

TINY = ["model.hidden_dim=16", "model.num_layers=1", "train.batch_size=16", "loss.critic_ratio=1"]
TINY += ["loss.max_rollout_steps=1", "train.steps=6", "train.checkpoint_every=2", "train.log_every=1"]


def _distiller(*overrides: str) -> Distiller:
    cfg = apply_overrides(toy2d_rcm(), TINY + list(overrides))
    task = Toy2DTask(cfg.data)
    torch.manual_seed(0)
    return Distiller(cfg, build_toy2d_net(cfg.model, task), task, parameterization="rf")


def test_trainer_checkpoints_and_resumes_exactly(tmp_path):
    full = Trainer(_distiller(), DirectoryStore(tmp_path / "a")).run()
    assert full.status == "completed" and full.step == 6
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-2", "step-4", "step-6"]
    d = _distiller()  # interrupted after step 4 (a cancel: it checkpoints and stops)
    Trainer(d, DirectoryStore(tmp_path / "b"), TrainHooks(cancel_requested=lambda: d.step >= 4)).run()
    resumed = Trainer(_distiller(), DirectoryStore(tmp_path / "b"))
    assert resumed.resume()["step"] == 4 and resumed.recovery_count == 1
    rest = resumed.run()
    assert rest.losses == full.losses[4:]  # bit-exact: weights, optimizers, EMA and RNG all came back


def test_cancel_and_time_budget_stop_at_a_log_step_with_a_checkpoint(tmp_path):
    calls = []
    hooks = TrainHooks(cancel_requested=lambda: len(calls) >= 3, log=lambda step, m: calls.append(step))
    result = Trainer(_distiller("train.checkpoint_every=0"), DirectoryStore(tmp_path / "c"), hooks).run()
    assert result.status == "cancelled" and result.step == 3
    assert latest_checkpoint(tmp_path / "c").name == "step-3"
    budget = Trainer(_distiller("train.max_minutes=1e-9"), DirectoryStore(tmp_path / "t")).run()
    assert budget.status == "time_limit" and budget.step == 1
    spent = Trainer(_distiller("train.max_minutes=1e-9"), DirectoryStore(tmp_path / "t"))
    spent.resume()  # a recovery after the budget was spent trains no further
    assert spent.run().status == "time_limit" and spent.distiller.step == 1
    sitting = Trainer(_distiller("train.max_minutes=1e-9"), DirectoryStore(tmp_path / "t"), budget_spans_resumes=False)
    sitting.resume()  # a new sitting of a local run: its own budget, the manifest keeps the total
    assert sitting.run().status == "time_limit" and sitting.distiller.step == 2
    before = load_checkpoint(_distiller(), tmp_path / "t" / "step-1")["train_seconds"]
    assert load_checkpoint(_distiller(), tmp_path / "t" / "step-2")["train_seconds"] > before


def _poison_after(distiller: Distiller, step: int, *, where: str) -> None:
    """From `step` on, the student's first weight is inf (where=weights) or lambda is 1e300 (where=loss)."""
    original = distiller.train_step

    def train_step():
        if distiller.step >= step:
            if where == "weights":
                with torch.no_grad():
                    next(distiller.student.parameters()).view(-1)[0] = math.inf
            else:
                distiller.config.loss.dmd_weight = 1e300  # the reproduction: inf in float32
        return original()

    distiller.train_step = train_step


@pytest.mark.parametrize("where", ["loss", "weights"])
def test_non_finite_step_fails_naming_step_and_term_and_keeps_the_last_finite_checkpoint(tmp_path, where):
    d = _distiller("train.log_every=3")
    _poison_after(d, 4, where=where)  # step 5 is the first non-finite one; the guard reads it at step 6
    with pytest.raises(NonFiniteError) as info:
        Trainer(d, DirectoryStore(tmp_path)).run()
    assert info.value.step == 5 and "loss" in info.value.terms
    assert str(info.value).startswith("non-finite training at step 5: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-4"]  # no step-6 written
    restored = _distiller()
    load_checkpoint(restored, latest_checkpoint(tmp_path))
    check_finite_state(restored.ema.model.state_dict(), "ema")  # the last checkpoint is finite
    with pytest.raises(NonFiniteError, match="student.net"):
        check_finite_state(d.student.state_dict(), "student")
