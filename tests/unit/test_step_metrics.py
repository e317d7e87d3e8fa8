"""StepMetrics: a step's metrics stay on the device until read (no host sync per step)."""

import pytest
import torch

from rcm_core.distill import StepMetrics


def test_values_are_read_once_and_cached_as_floats():
    reads = []

    class Counting(torch.Tensor):
        def item(self):
            reads.append(1)
            return super().item()

    loss = torch.tensor(1.5).as_subclass(Counting)
    m = StepMetrics({"loss": loss, "step_seconds": 0.25})
    assert reads == []  # building the mapping reads nothing
    assert m["loss"] == 1.5 and isinstance(m["loss"], float)
    assert m["loss"] == 1.5 and reads == [1]  # cached after the first read
    assert dict(m) == {"loss": 1.5, "step_seconds": 0.25} and len(m) == 2 and "loss" in m
    with pytest.raises(KeyError):
        m["nope"]


def test_train_step_returns_lazy_metrics_that_read_as_floats():
    from rcm_core.config import toy2d_rcm
    from rcm_core.data.toy2d import Toy2DTask
    from rcm_core.distill import Distiller
    from rcm_core.teacher import build_toy2d_net

    cfg = toy2d_rcm()
    task = Toy2DTask(cfg.data)
    torch.manual_seed(0)
    d = Distiller(cfg, build_toy2d_net(cfg.model, task), task, parameterization="rf")
    m = d.train_step()
    assert isinstance(m, StepMetrics)
    assert all(isinstance(m[k], float) for k in ("loss", "scm_loss", "dmd_loss", "fake_score_loss", "grad_norm"))
    assert m["loss"] == pytest.approx(m["scm_loss"] + cfg.loss.dmd_weight * m["dmd_loss"], rel=1e-5)
