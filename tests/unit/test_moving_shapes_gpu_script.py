"""scripts/gpu/moving_shapes.sh on the CPU: the teacher phase with SMOKE=1 (tiny teacher, few steps, a CFG sweep
over a subset of the evaluation prompts) leaves the files the GPU call brings back; bad invocations exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu" / "moving_shapes.sh"


def _run(*args, **env):
    base = {**os.environ, "PY": sys.executable, "SMOKE": "1"}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=300
    )


def test_teacher_phase_smoke_writes_the_teacher_folder_strip_and_log(tmp_path):
    done = _run("teacher", OUT=str(tmp_path), SCALES="1.5,4", RCM_GIT_COMMIT="abc123")
    assert done.returncode == 0, done.stdout + done.stderr
    folder = tmp_path / "moving_shapes_teacher"
    names = {p.name for p in folder.iterdir()}
    assert names == {"config.json", "diffusion_pytorch_model.safetensors", "moving_shapes.json", "README.md"}
    meta = json.loads((folder / "moving_shapes.json").read_text())
    assert meta["training"]["git_commit"] == "abc123"
    assert [r["guidance_scale"] for r in meta["eval"]["rows"]] == [1.5, 4.0] and meta["eval"]["prompts"] == 24
    assert meta["default_sampler"]["guidance_scale"] == meta["eval"]["chosen_guidance_scale"]
    assert {p.name for p in tmp_path.iterdir()} == {
        "moving_shapes_teacher",
        "teacher.log",
        "teacher_samples.png",
        "teacher_samples.gif",
        "teacher_samples.txt",
    }  # 8 files in all: the device tool brings back at most 8
    assert "default guidance ->" in done.stdout


def test_bad_invocations_exit_2_with_one_line(tmp_path):
    usage = _run("train", OUT=str(tmp_path))
    assert usage.returncode == 2 and "usage:" in usage.stderr
    no_teacher = _run("distill", OUT=str(tmp_path), TEACHER=str(tmp_path / "missing"))
    assert no_teacher.returncode == 2 and "no moving-shapes teacher" in no_teacher.stderr
