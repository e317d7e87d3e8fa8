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
