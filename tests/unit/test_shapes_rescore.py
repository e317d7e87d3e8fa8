"""`rcm bench shapes --teacher-only` (the shipped teacher's rows, no students) and `--rescore` (the same saved
samples scored again by the current judge, as done when the judge was fixed in issue 20)."""

import json

import numpy as np

from rcm_core.cli import main
from rcm_core.eval.shapes import benchmark_prompts


def test_teacher_only_bench_saves_images_that_rescore_to_the_same_rows(tmp_path, capsys):
    out, again = tmp_path / "bench", tmp_path / "rescored"
    args = ["--num-samples", "12", "--diversity-samples", "3", "--teacher-steps", "1"]
    assert main(["bench", "shapes", "--teacher-only", "--out", str(out), *args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(r["model"], r["steps"]) for r in report["rows"]] == [("teacher (Euler, CFG 2)", 1)]
    stored = np.load(out / "images.npz")
    assert stored["0/images"].shape == (12, 32, 32, 3) and stored["0/diversity"].shape == (4, 3, 32, 32, 3)
    assert len(benchmark_prompts(12)) == 12
    assert main(["bench", "shapes", "--rescore", str(out), "--out", str(again)]) == 0
    rescored = json.loads((again / "report.json").read_text())
    assert rescored["rows"] == report["rows"] and rescored["rescored_from"] == str(out)
    capsys.readouterr()


def test_bench_shapes_refuses_conflicting_options(tmp_path, capsys):
    assert main(["bench", "shapes", "--out", str(tmp_path)]) == 2  # neither --run nor --teacher-only
    assert "--teacher-only" in capsys.readouterr().err
    assert main(["bench", "shapes", "--teacher-only", "--run", f"a={tmp_path}"]) == 2
    assert main(["bench", "shapes", "--rescore", str(tmp_path), "--teacher-only"]) == 2
    assert main(["bench", "shapes", "--rescore", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "needs report.json and images.npz" in capsys.readouterr().err
    assert main(["bench", "toy2d", "--teacher-only"]) == 2
