"""`rcm bench moving-shapes` on a tiny random teacher (CPU): the table, report and strip it writes, and the target
checks computed from the rows' numbers (not that scores are high: the teacher is untrained)."""

import json
import math

import pytest
import torch

from rcm_core.cli import main
from rcm_core.eval.moving_shapes import benchmark_prompts, check_targets, format_table
from rcm_core.moving_shapes_teacher import MovingShapesTeacherConfig, build_teacher_net, save_moving_shapes_teacher

TINY = dict(
    num_layers=1,
    num_attention_heads=2,
    attention_head_dim=16,
    ffn_dim=32,
    freq_dim=32,
    text_dim=16,
    steps=1,
    batch_size=2,
    sample_steps=2,
    guidance_scale=2.0,
)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    cfg = MovingShapesTeacherConfig(**TINY)
    torch.manual_seed(0)
    net = build_teacher_net(cfg)
    return save_moving_shapes_teacher(net, tmp_path_factory.mktemp("teacher") / "t", cfg, {"steps_done": 0})


def test_bench_writes_table_report_and_strip_with_two_seeds_of_rcm(teacher_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    # the teacher's own transformer folder doubles as a "student" export (a bare transformer: default mid times)
    runs = [a for name in ("rCM", "rCM", "sCM", "DMD") for a in ("--run", f"{name}={teacher_dir}")]
    code = main(
        ["bench", "moving-shapes", "--teacher", str(teacher_dir), *runs, "--out", str(out)]
        + ["--num-samples", "4", "--diversity-samples", "2", "--teacher-steps", "2", "--seeds", "5"]
        + ["--student-steps", "1,4"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| model | steps | n | score |" in printed and "Targets (issue 20):" in printed
    report = json.loads((out / "report.json").read_text())
    rows = {(r["model"], r["steps"]): r for r in report["rows"]}
    teacher = "teacher (Euler, CFG 2)"
    assert set(rows) == {(teacher, 2)} | {(m, s) for m in ("rCM", "sCM", "DMD") for s in (1, 4)}
    assert rows[("rCM", 4)]["n"] == 2 and rows[("sCM", 1)]["n"] == 1 and rows[(teacher, 2)]["n"] == 1  # runs x seeds
    for r in rows.values():
        assert 0 <= r["overall"] <= 1 and 0 <= r["motion"] <= 1 and 0 <= r["temporal"] <= 1 and r["ms_per_clip"] > 0
        assert {"single_object", "color_attr", "held_out", "diversity", "recall", "overall_std"} <= set(r)
    assert report["seeds"] == [5] and len(report["students"]["rCM"]) == 2
    assert [t["target"].split(" ")[0] for t in report["targets"]] == ["rCM", "rCM", "rCM", "rCM", "sCM"]
    assert all(t["status"] for t in report["targets"])
    assert (out / "strip.png").stat().st_size > 0 and (out / "strip.gif").stat().st_size > 0
    assert "Targets (issue 20):" in (out / "table.md").read_text()


def _row(model, steps, overall, diversity=1.0, n=2, color_attr=0.9, motion=0.9):
    return dict(
        model=model, steps=steps, n=n, overall=overall, diversity=diversity, color_attr=color_attr, motion=motion
    )


def test_targets_are_computed_from_the_numbers():
    teacher = "teacher (Euler, CFG 3)"
    rows = [
        _row(teacher, 50, 0.80, diversity=1.00),
        _row("rCM", 4, 0.77, diversity=0.95),  # 0.77 >= 0.95 x 0.80 = 0.76: met
        _row("rCM", 1, 0.60, diversity=0.80),  # 0.60 < 0.85 x 0.80 = 0.68: missed
        _row("DMD", 4, 0.78, diversity=0.70),
        _row("sCM", 4, 0.70, color_attr=0.82, motion=0.88),  # gaps 0.08 (color_attr) and 0.02 (motion)
    ]
    status = {t["target"]: t["status"] for t in check_targets(rows, teacher=teacher, teacher_steps=50)}
    assert status == {
        "rCM 4-step score >= 0.95x teacher": "met",
        "rCM 1-step score >= 0.85x teacher": "missed",
        "rCM 4-step diversity within 10% of the teacher's": "met",
        "rCM 4-step diversity above DMD's": "met",
        "sCM visibly below rCM on attribute binding or motion": "met",
    }
    # one seed and a margin under 0.03: no claim; sCM not visibly below; missing rows are said to be missing
    rows[1] = _row("rCM", 4, 0.765, diversity=0.85, n=1)
    rows[4] = _row("sCM", 4, 0.70, color_attr=0.88, motion=0.89)
    targets = check_targets(rows[:2] + rows[3:], teacher=teacher, teacher_steps=50)
    status = {t["target"]: t["status"] for t in targets}
    assert status["rCM 4-step score >= 0.95x teacher"].startswith("inconclusive (met by 0.005")
    assert status["rCM 1-step score >= 0.85x teacher"] == "not measured"
    assert status["rCM 4-step diversity within 10% of the teacher's"] == "missed"
    assert status["sCM visibly below rCM on attribute binding or motion"] == "missed"
    assert "0.765 (n=1) vs 0.95 x 0.800 = 0.760" in targets[0]["detail"]
    rows[0] = _row(teacher, 50, 0.80, diversity=0.0)  # nothing to compare the student's spread with
    status = {t["target"]: t["status"] for t in check_targets(rows, teacher=teacher, teacher_steps=50)}
    assert status["rCM 4-step diversity within 10% of the teacher's"] == "not measured"


def test_table_and_prompts():
    prompts = benchmark_prompts(60)  # a spread over the grammar, not a prefix of it (one base's motions)
    assert len({p.caption() for p in prompts}) == 60 and len({p.category for p in prompts}) == 6
    assert len({p.motion for p in prompts}) == 5 and any(p.is_held_out() for p in prompts)
    table = format_table(
        [dict(model="rCM", steps=4, n=2, overall=0.9, overall_std=0.01, motion=0.5, held_out=math.nan)]
    )
    assert "| rCM | 4 | 2 | 0.900 +- 0.010 |" in table and "| 0.50 |" in table and "| - |" in table


def test_bench_refuses_bad_arguments(teacher_dir, tmp_path, capsys):
    assert main(["bench", "moving-shapes", "--out", str(tmp_path)]) == 2
    assert "--teacher DIR" in capsys.readouterr().err
    assert main(["bench", "moving-shapes", "--teacher", str(teacher_dir), "--run", f"rCM={tmp_path}/nope"]) == 2
    assert "expected NAME=DIR" in capsys.readouterr().err
    assert main(["bench", "moving-shapes", "--teacher", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a moving-shapes teacher folder" in capsys.readouterr().err
    assert main(["bench", "shapes", "--teacher", str(teacher_dir)]) == 2
