"""Config loading: strict keys, typed values, presets, overrides, and the CLI's exit code 2."""

import dataclasses
import subprocess
import sys

import pytest

from rcm_core.config import ConfigError, DistillConfig, apply_overrides, config_from_dict, config_to_dict, load_config


def test_round_trip_through_dict():
    cfg = DistillConfig()
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_yaml_preset_and_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: toy2d-dmd\ntrain:\n  steps: 7\nloss:\n  fd_step: 1e-4\n")
    cfg = load_config(p)
    assert cfg.train.steps == 7 and cfg.loss.scm_weight == 0.0 and cfg.loss.dmd_weight == 1.0
    assert cfg.loss.fd_step == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string: still a number here


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"loss": {"scm_weght": 1.0}}, "loss.scm_weght: unknown key"),
        ({"trian": {}}, "trian: unknown key"),
        ({"train": {"steps": "many"}}, "train.steps: expected an integer"),
        ({"train": {"steps": 1.5}}, "train.steps: expected an integer"),
        ({"data": {"dataset": "moons"}}, "data.dataset: must be one of ring8, grid25"),
        ({"loss": {"scm_weight": 0.0, "dmd_weight": 0.0}}, "loss: scm_weight and dmd_weight are both 0"),
        ({"eval": {"student_steps": [1, "x"]}}, "eval.student_steps[1]: expected an integer"),
        ({"optim": {"lr": -1.0}}, "optim: lr and fake_lr must be > 0"),
        ({"teacher": {"path": 3}}, "teacher.path: expected a string"),
        ({"eval": {"student_mid_times": [1.0, 1.1]}}, "eval: student mid times must be strictly decreasing"),
        ({"eval": {"student_mid_times": [1.6]}}, "eval: student mid times must be in (0.2, pi/2)"),
    ],
)
def test_bad_config_names_the_key(data, fragment):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    assert fragment in str(exc.value)


def test_overrides_parse_values():
    cfg = apply_overrides(DistillConfig(), ["train.steps=12", "loss.time_derivative=semi_continuous"])
    assert cfg.train.steps == 12 and cfg.loss.time_derivative == "semi_continuous"
    with pytest.raises(ConfigError, match="loss.nope: unknown key"):
        apply_overrides(cfg, ["loss.nope=1"])


def test_configs_shipped_in_repo_load():
    from pathlib import Path

    files = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml"))
    assert files, "configs/ holds the documented example configs"
    for f in files:
        assert dataclasses.is_dataclass(load_config(f))


def _rcm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rcm_core.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("loss:\n  dmd_weight: lots\n")
    res = _rcm("distill", str(p))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["rcm: error: loss.dmd_weight: expected a number, got 'lots'"]
    assert "Traceback" not in res.stderr


def test_cli_missing_file_and_bad_flag_exit_2(tmp_path):
    res = _rcm("distill", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "no such file" in res.stderr
    res = _rcm("sample", "--steps", "two", "--checkpoint", "x", "--out", "y.png")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "--steps" in res.stderr
    for flag, value in (("--steps", "0"), ("--num-samples", "-3")):
        res = _rcm("sample", flag, value, "--checkpoint", "x", "--out", "y.png")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and f"{flag}: must be an integer >= 1" in lines[0]
    res = _rcm("eval", "--checkpoint", str(tmp_path))
    assert res.returncode == 2 and "neither a checkpoint" in res.stderr
    for flag, value, says in (("--num-samples", "5", "must be >= 10"), ("--steps", "1,0", "must be an integer >= 1")):
        res = _rcm("eval", "--checkpoint", str(tmp_path), flag, value)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and flag in lines[0] and says in lines[0], res.stderr


def test_cli_bad_student_mid_times_exit_2_with_one_line(tmp_path):
    res = _rcm("bench", "shapes", "--run", f"a={tmp_path}", "--student-mid-times", "1.1,1.3")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "--student-mid-times" in lines[0], res.stderr
    assert "strictly decreasing" in lines[0] and "Traceback" not in res.stderr


def test_cli_help_lists_commands():
    res = _rcm("--help")
    assert res.returncode == 0
    for cmd in ("distill", "sample", "eval", "teacher", "demo", "bench"):
        assert cmd in res.stdout


def test_shapes_gpu_schedules_hold_the_measured_settings_and_refuse_without_cuda():
    """configs/shapes-*-gpu.yaml are the README's documented longer schedule: the settings of the measured runs."""
    from pathlib import Path

    import torch

    root = Path(__file__).parents[2]
    rcm, dmd = (load_config(root / f"configs/shapes-{m}-gpu.yaml") for m in ("rcm", "dmd"))
    for cfg in (rcm, dmd):
        assert (cfg.train.steps, cfg.train.batch_size, cfg.train.device) == (2100, 128, "cuda")
        assert (cfg.optim.lr, cfg.loss.critic_ratio) == (1e-4, 2)
        assert cfg.data.pool_size == 200000 and cfg.teacher.guidance_scale == 2.0
        assert cfg.optim.lr_schedule == "cosine" and cfg.eval.student_mid_times == [1.1, 0.8, 0.5]
    assert (rcm.loss.scm_weight, rcm.loss.dmd_weight, rcm.loss.tangent_warmup_steps) == (1.0, 0.26, 200)
    assert (dmd.loss.scm_weight, dmd.loss.dmd_weight) == (0.0, 1.0)
    if torch.cuda.is_available():
        return
    res = _rcm("distill", "configs/shapes-rcm-gpu.yaml", cwd=root)
    assert res.returncode == 2
    expected = "rcm: error: train.device: cuda requested but no CUDA device is available"
    assert res.stderr.strip().splitlines() == [expected]
