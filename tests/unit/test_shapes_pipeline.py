"""Distillation of the shapes teacher: prompt files, the pre-rendered pool, config checks, the CLI end to end
(distill -> checkpoint -> `rcm eval` report + grid -> `rcm bench shapes`), and the shipped teacher."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rcm_core import pipeline
from rcm_core.checkpoint import latest_checkpoint
from rcm_core.config import PRESETS, ConfigError, apply_overrides
from rcm_core.data.shapes import PooledShapesTask, ShapesTask, all_prompts, load_prompt_file, parse_caption
from rcm_core.eval.shapes import benchmark_prompts, format_table
from rcm_core.shapes_teacher import load_shapes_teacher
from rcm_core.tasks.shapes import SHIPPED_TEACHER

TINY = [
    "train.steps=2",
    "train.batch_size=2",
    "train.log_every=1",
    "train.checkpoint_every=1",
    "eval.num_samples=12",
    "eval.diversity_samples=4",
    "eval.student_steps=[1]",
    "eval.teacher_steps=[1]",
]


def test_parse_caption_round_trips_every_prompt_and_rejects_others():
    for p in all_prompts():
        assert parse_caption("  " + p.caption().upper() + " ") == p
    with pytest.raises(ValueError, match="not a caption of the shapes grammar: 'a photo of a hexagon'"):
        parse_caption("a photo of a hexagon")


def test_prompt_file_skips_comments_and_names_the_bad_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# my prompts\n\na photo of a red circle\na photo of three squares\n")
    assert [p.caption() for p in load_prompt_file(good)] == ["a photo of a red circle", "a photo of three squares"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a red circle\n\na photo of a purple circle\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 3: not a caption.*purple"):
        load_prompt_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no captions"):
        load_prompt_file(empty)
    with pytest.raises(ValueError, match="cannot read it"):
        load_prompt_file(tmp_path / "missing.txt")


def test_task_restricted_to_prompt_file_draws_only_those_prompts():
    prompts = [parse_caption("a photo of a red circle"), parse_caption("a photo of four triangles")]
    task = ShapesTask(prompts=prompts)
    drawn = task.sample_prompts(64, generator=torch.Generator().manual_seed(0))
    assert {p.caption() for p in drawn} == {p.caption() for p in prompts}


def test_pool_is_deterministic_matches_its_captions_and_ignores_worker_count():
    a = PooledShapesTask(300, seed=3, workers=0)
    b = PooledShapesTask(300, seed=3, workers=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.ids, b.ids)
    c = PooledShapesTask(300, seed=4, workers=0)
    assert not torch.equal(a.images, c.images)
    x0, cond = a.sample(16, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (16, 3, 32, 32) and x0.min() >= -1 and x0.max() <= 1 and cond["ids"].shape == (16, 12)
    # every pooled image is judged correct for its own caption by the scorer
    from rcm_core.eval.geneval import score

    inv = {v: k for k, v in a.tokenizer.vocab.items()}
    captions = [" ".join(inv[int(t)] for t in row[1:] if int(t) > 2) for row in a.ids[:100]]
    images = list(a.images[:100].permute(0, 2, 3, 1).numpy())
    assert score([parse_caption(c) for c in captions], images)["overall"] == 1.0


def test_config_rejects_mismatched_task_and_prompt_file_on_2d():
    with pytest.raises(ConfigError, match="does not match data.dataset"):
        apply_overrides(PRESETS["shapes-rcm"](), ["data.dataset=ring8"])
    with pytest.raises(ConfigError, match="prompt_file is only valid with dataset 'shapes'"):
        apply_overrides(PRESETS["toy2d-rcm"](), ["data.prompt_file=p.txt"])


def test_shipped_teacher_loads_and_records_how_it_was_made():
    net, meta = load_shapes_teacher(SHIPPED_TEACHER)
    assert SHIPPED_TEACHER.stat().st_size <= 25 * 10**6
    assert meta["parameterization"] == "rf" and meta["config"]["guidance_scale"] == 2.0
    training = meta["training"]
    assert "H100" in training["hardware"] and training["command"] and len(training["stages"]) == 2
    x = torch.randn(2, 3, 32, 32)
    assert torch.isfinite(net(x, torch.rand(2, dtype=torch.float64), ShapesTask().null_cond(2))).all()


def test_benchmark_prompts_cycle_every_prompt():
    prompts = benchmark_prompts(2 * len(all_prompts()) + 3)
    assert prompts[: len(all_prompts())] == all_prompts() and prompts[-1] == all_prompts()[2]


def _rcm(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "rcm_core.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_cli_distills_evaluates_and_benchmarks_the_shapes_teacher(tmp_path):
    run = tmp_path / "run"
    sets = [a for kv in TINY + [f"train.output_dir={run}"] for a in ("--set", kv)]
    res = _rcm("distill", "configs/shapes-rcm.yaml", *sets)
    assert res.returncode == 0, res.stderr
    assert "step      2/2" in res.stdout and "| student (EMA) | 1 |" in res.stdout

    ckpt = latest_checkpoint(run / "checkpoints")
    distiller, cfg, _ = pipeline.load_student(ckpt)
    assert distiller.step == 2 and cfg.task == "shapes"
    shipped, _ = load_shapes_teacher(SHIPPED_TEACHER)
    for a, b in zip(distiller.teacher.net.state_dict().values(), shipped.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the teacher is reloaded from its file, not left at random init
    assert not all(
        torch.equal(a, b)
        for a, b in zip(distiller.student.net.state_dict().values(), shipped.state_dict().values(), strict=True)
    )  # two steps moved the student

    out = tmp_path / "eval"
    res = _rcm("eval", "--checkpoint", str(run), "--out", str(out), "--steps", "1,2")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert [(r["model"], r["steps"]) for r in report["rows"]] == [
        ("teacher (Euler, CFG 2)", 1),
        ("student (EMA)", 1),
        ("student (EMA)", 2),
    ]
    for r in report["rows"]:
        assert 0 <= r["overall"] <= 1 and r["ms_per_image"] > 0 and np.isfinite(r["diversity"])
    assert (out / "samples.png").stat().st_size > 1000
    assert format_table(report["rows"]).count("\n") == 4

    bench = tmp_path / "bench"
    res = _rcm(
        "bench",
        "shapes",
        "--run",
        f"rCM={run}",
        "--out",
        str(bench),
        "--num-samples",
        "12",
        "--diversity-samples",
        "4",
        "--teacher-steps",
        "2",
    )
    assert res.returncode == 0, res.stderr
    table = (bench / "table.md").read_text()
    assert (bench / "grid.png").is_file() and "| rCM | 4 |" in table and "| teacher (Euler, CFG 2) | 2 |" in table

    # rcm sample: images for given prompts (.pt: uint8 images + captions, same seed -> same images), a grid (.png)
    prompts = ["a photo of a red circle", "A photo of two  squares"]
    args = ["sample", "--checkpoint", str(run), "--steps", "2", "--num-samples", "3", "--prompt", prompts[0]]
    args += ["--prompt", prompts[1]]
    res = _rcm(*args, "--out", str(tmp_path / "s.pt"))
    assert res.returncode == 0, res.stderr
    saved = torch.load(tmp_path / "s.pt")
    assert saved["images"].shape == (6, 32, 32, 3) and saved["images"].dtype == torch.uint8
    assert saved["captions"] == ["a photo of a red circle"] * 3 + ["a photo of two squares"] * 3
    assert saved["images"].float().std() > 0  # not a blank tensor
    res = _rcm(*args, "--out", str(tmp_path / "s.png"))
    assert res.returncode == 0, res.stderr
    from PIL import Image

    grid = Image.open(tmp_path / "s.png")
    assert grid.size[1] == 2 * (32 * 3 + 4)  # one row per prompt
    # the same seed gives a caption the same images, whatever the other captions and their order
    swapped_args = [*args[:7], "--prompt", prompts[1], "--prompt", prompts[0], "--out", str(tmp_path / "again.pt")]
    again = _rcm(*swapped_args)
    assert again.returncode == 0, again.stderr
    swapped = torch.load(tmp_path / "again.pt")["images"]
    assert torch.equal(swapped[:3], saved["images"][3:]) and torch.equal(swapped[3:], saved["images"][:3])
    for bad, field in (
        (["--prompt", "a photo of a purple hexagon", "--out", str(tmp_path / "x.png")], "--prompt"),
        (["--out", str(tmp_path / "x.csv")], "--out"),
    ):
        res = _rcm("sample", "--checkpoint", str(run), *bad)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and field in lines[0] and "Traceback" not in res.stderr
        assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.csv").exists()


def test_bench_shapes_bad_run_is_one_line_exit_2(tmp_path):
    res = _rcm("bench", "shapes", "--run", f"rCM={tmp_path / 'nope'}")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "--run rCM=" in res.stderr
