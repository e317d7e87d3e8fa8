"""configs/moving-shapes-{rcm,scm,dmd}-gpu.yaml: what they say, and that each runs through `rcm distill` (the
diffusers task on moving-shapes shards) on the CPU with a smoke override and a tiny teacher."""

import json
from pathlib import Path

import pytest

from rcm_core.cli import main
from rcm_core.config import load_config
from rcm_core.data.moving_shapes_dataset import write_dataset
from rcm_core.moving_shapes_teacher import MovingShapesTeacherConfig, build_teacher_net, save_moving_shapes_teacher

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, freq_dim=32, text_dim=16)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("moving_shapes")
    cfg = MovingShapesTeacherConfig(**TINY, sample_steps=2)
    teacher = save_moving_shapes_teacher(build_teacher_net(cfg), root / "teacher", cfg, {"steps_done": 0})
    write_dataset(str(root / "data"), count=16, text_dim=16)
    return teacher, root / "data", root


@pytest.mark.parametrize(
    "name, scm, dmd",
    [("moving-shapes-rcm-gpu", 1.0, 0.09), ("moving-shapes-scm-gpu", 1.0, 0.0), ("moving-shapes-dmd-gpu", 0.0, 1.0)],
)
def test_gpu_config_says_what_the_benchmark_needs_and_runs_on_the_cpu(tiny_setup, name, scm, dmd):
    teacher, data, root = tiny_setup
    path = CONFIGS / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.task == "diffusers" and cfg.data.dataset == "latents" and cfg.data.latent_shape == [3, 8, 32, 32]
    assert (cfg.loss.scm_weight, cfg.loss.dmd_weight) == (scm, dmd)
    assert cfg.teacher.path == "rcm_core/assets/moving_shapes_teacher" and cfg.teacher.family == "wan2.1"
    assert cfg.eval.student_steps == [1, 2, 4] and cfg.train.max_minutes > 0 and cfg.optim.lr_schedule == "constant"
    out = root / name
    smoke = {
        "train.device": "cpu",
        "teacher.path": str(teacher),
        "data.uri": str(data),
        "train.steps": 2,
        "train.batch_size": 2,
        "train.output_dir": str(out),
        "eval.num_samples": 10,
        "eval.teacher_steps": "[2]",
    }
    args = ["distill", str(path), "--no-resume"] + [a for k, v in smoke.items() for a in ("--set", f"{k}={v}")]
    assert main(args) == 0
    assert (out / "checkpoints" / "step-2" / "manifest.json").is_file()
    rows = json.loads((out / "eval" / "report.json").read_text())["rows"]
    assert sorted(r["steps"] for r in rows if r["model"].startswith("student")) == [1, 2, 4]
