"""The JSON contract: every example job spec the service accepts converts into rcm_core's DistillConfig."""

import json
from pathlib import Path

import pytest

from service.schemas import JobCreate
from workers.spec import distill_config_from_spec

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "jobs").glob("*.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_spec_converts(path):
    spec = JobCreate.model_validate(json.loads(path.read_text())).model_dump(mode="json")
    cfg = distill_config_from_spec(spec, output_dir="/tmp/x", teacher_path="/tmp/t.safetensors")
    assert cfg.loss.dmd_weight == spec["method"]["dmd_weight"]
    assert cfg.train.steps == spec["schedule"]["steps"]
    assert cfg.teacher.guidance_scale == spec["teacher"]["guidance_scale"]


def test_examples_exist():
    assert len(EXAMPLES) >= 3


def test_defaults_match_rcm_core_defaults():
    """The service's defaults are rcm_core's: a minimal spec gives the same loss config as the preset."""
    from rcm_core.config import toy2d_rcm

    spec = JobCreate(name="d", teacher={"uri": "builtin:toy2d"}).model_dump(mode="json")
    cfg = distill_config_from_spec(spec, output_dir="runs/x", teacher_path=None)
    assert cfg.loss == toy2d_rcm().loss and cfg.optim == toy2d_rcm().optim
