"""rcm_core.preview: the EMA student alone out of a full checkpoint (what sample requests and `rcm sample` load)."""

import pytest
import torch

from rcm_core import preview
from rcm_core.checkpoint import save_checkpoint
from rcm_core.config import ConfigError
from tests.unit.test_checkpoint import _distiller


def test_load_ema_student_reads_the_checkpoints_ema_weights_only(tmp_path):
    d = _distiller()
    teacher_net = d.teacher.net
    for _ in range(3):
        d.train_step()
    path = save_checkpoint(d, tmp_path, d.step)
    model = preview.load_ema_student(path, teacher_net, "rf")
    ema, student = d.ema.model.state_dict(), d.student.state_dict()
    got = model.state_dict()
    assert got.keys() == ema.keys()
    assert all(torch.equal(got[k], ema[k]) for k in ema)
    # not the student's raw weights, nor the teacher's: the EMA is its own average
    assert any(not torch.equal(got[k], student[k]) for k in student)
    assert any(not torch.equal(got["net." + k], v) for k, v in teacher_net.state_dict().items())
    assert preview.checkpoint_step(path) == 3 and not model.training


def test_load_ema_student_refuses_an_incomplete_checkpoint(tmp_path):
    d = _distiller()
    (tmp_path / "step-1").mkdir()
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        preview.load_ema_student(tmp_path / "step-1", d.teacher.net, "rf")


def test_load_ema_student_refuses_a_checkpoint_of_another_architecture(tmp_path):
    """A student with parameters the teacher's network lacks (e.g. adapters) is refused, not half-loaded."""
    d = _distiller()
    bigger = _distiller()
    bigger.ema.model.net.register_parameter("adapter", torch.nn.Parameter(torch.zeros(2)))
    path = save_checkpoint(bigger, tmp_path / "b", 0)
    with pytest.raises(ConfigError, match="1 extra, 0 missing"):
        preview.load_ema_student(path, d.teacher.net, "rf")
