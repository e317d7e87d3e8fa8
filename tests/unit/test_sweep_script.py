"""scripts/gpu/shapes_sweep.sh on the CPU with a tiny schedule: train, resume in a second sitting, benchmark."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu" / "shapes_sweep.sh"


def _sweep(tmp_path, **env):
    variants = "rCM|configs/shapes-rcm.yaml|data.pool_size=0 train.log_every=1 train.device=cpu"
    base = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RUNS": str(tmp_path / "runs"),
        "OUT": str(tmp_path / "out"),
        "BATCH": "2",
        "MINUTES": "0.02",
        "VARIANTS": variants,
    }
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env={**base, **env}, capture_output=True, text=True)


def test_sweep_trains_resumes_and_benchmarks(tmp_path):
    refused = _sweep(tmp_path, RESUME="required")
    assert refused.returncode == 3 and "no complete checkpoint" in refused.stderr
    assert not (tmp_path / "runs" / "rCM").exists()  # nothing was started

    first = _sweep(tmp_path, RESUME="1", SKIP_BENCH="1")
    assert first.returncode == 0, first.stdout + first.stderr
    steps = sorted((tmp_path / "runs" / "rCM" / "checkpoints").glob("step-*"))
    assert len(steps) == 1 and not (tmp_path / "out" / "report.json").exists()

    second = _sweep(
        tmp_path,
        RESUME="required",
        NUM_SAMPLES="12",
        BENCH_EXTRA="--diversity-samples 2 --teacher-steps 1",
    )
    assert second.returncode == 0, second.stdout + second.stderr
    first_step = int(steps[0].name.split("-")[1])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["student_steps_trained"]["rCM"] > first_step  # the second sitting continued the run
    assert [r["steps"] for r in report["rows"] if r["model"] == "rCM"] == [1, 2, 4]
