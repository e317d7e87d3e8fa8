"""The JSON contract: every example job spec the service accepts converts into rcm_core's configs; the worker's
checks of a job's prompt file."""

import json
from pathlib import Path

import pytest

from service.schemas import JobCreate
from workers.spec import distill_config_from_spec, parallel_config_from_spec

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


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_resources_convert(path):
    spec = JobCreate.model_validate(json.loads(path.read_text())).model_dump(mode="json")
    pconfig = parallel_config_from_spec(spec)
    r = spec["resources"]
    assert (pconfig.dp_shard_degree, pconfig.cp_degree) == (r["fsdp_degree"], r["cp_degree"])
    assert pconfig.activation_checkpoint == r["activation_checkpointing"]


def test_prompt_file_reaches_the_config():
    spec = JobCreate(
        name="p", teacher={"uri": "s3://ckpt/t.safetensors"}, data={"dataset": "shapes", "prompt_file_uri": "p.txt"}
    ).model_dump(mode="json")
    cfg = distill_config_from_spec(spec, output_dir="runs/x", teacher_path=None, prompt_file="/tmp/w/prompts.txt")
    assert cfg.data.dataset == "shapes" and cfg.data.prompt_file == "/tmp/w/prompts.txt"


def test_local_prompt_files_stay_inside_the_prompt_directory(tmp_path, monkeypatch):
    from workers import storage

    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "ok.txt").write_text("a photo of a red circle\n")
    (tmp_path / "secret.txt").write_text("AWS_SECRET_ACCESS_KEY=x\n")
    (tmp_path / "prompts" / "link.txt").symlink_to(tmp_path / "secret.txt")
    monkeypatch.delenv("RCM_PROMPT_DIR", raising=False)
    with pytest.raises(storage.PromptFileUnavailable, match="RCM_PROMPT_DIR is not set"):
        storage.fetch_prompt_file("ok.txt", tmp_path / "copy.txt")
    monkeypatch.setenv("RCM_PROMPT_DIR", str(tmp_path / "prompts"))
    assert storage.fetch_prompt_file("ok.txt", tmp_path / "copy.txt") == tmp_path / "prompts" / "ok.txt"
    for uri, reason in [("../secret.txt", "outside"), ("link.txt", "outside"), ("missing.txt", "no such file")]:
        with pytest.raises(storage.PromptFileUnavailable, match=reason):
            storage.fetch_prompt_file(uri, tmp_path / "copy.txt")


def test_malformed_or_missing_prompt_file_is_a_readable_error(tmp_path, monkeypatch):
    from rcm_core.config import ConfigError
    from workers import storage
    from workers.entrypoint import check_inputs

    monkeypatch.setenv("RCM_PROMPT_DIR", str(tmp_path))
    (tmp_path / "bad.txt").write_text("# captions\na photo of a red circle\na photo of a purple dragon\n")
    spec = JobCreate(
        name="p", teacher={"uri": "s3://ckpt/t.safetensors"}, data={"dataset": "shapes", "prompt_file_uri": "bad.txt"}
    ).model_dump(mode="json")
    with pytest.raises(ConfigError, match=r"data\.prompt_file_uri bad\.txt, line 3: not a caption") as err:
        check_inputs(spec)
    assert "dragon" not in str(err.value) and str(tmp_path) not in str(err.value)  # no file contents, no paths
    spec["data"]["prompt_file_uri"] = "gone.txt"
    with pytest.raises(storage.PromptFileUnavailable, match="gone.txt: no such file"):
        check_inputs(spec)


def test_shapes_spec_converts_on_the_shapes_preset_with_its_eval_defaults():
    from rcm_core.config import shapes_rcm

    spec = JobCreate(name="s", teacher={"uri": "builtin:shapes"}, data={"dataset": "shapes"}).model_dump(mode="json")
    cfg = distill_config_from_spec(spec, output_dir="runs/x", teacher_path=None)
    assert cfg.task == "shapes" and cfg.model == shapes_rcm().model
    assert (cfg.eval.num_samples, cfg.eval.teacher_steps, cfg.eval.student_steps) == (126, [4], [1, 2, 4])
    spec["eval"] = {"num_samples": 16, "diversity_samples": 4, "teacher_steps": [2, 4]}
    cfg = distill_config_from_spec(spec, output_dir="runs/x", teacher_path=None)
    assert (cfg.eval.num_samples, cfg.eval.diversity_samples, cfg.eval.teacher_steps) == (16, 4, [2, 4])
    assert cfg.eval.student_mid_times == shapes_rcm().eval.student_mid_times == [1.1, 0.8, 0.5]
    spec["eval"]["student_mid_times"] = [1.3, 1.0, 0.6]
    assert distill_config_from_spec(spec, output_dir="runs/x", teacher_path=None).eval.student_mid_times == [
        1.3,
        1.0,
        0.6,
    ]


def test_schedule_max_minutes_becomes_the_training_time_budget():
    spec = JobCreate(name="s", teacher={"uri": "builtin:toy2d"}).model_dump(mode="json")
    assert distill_config_from_spec(spec, output_dir="runs/x", teacher_path=None).train.max_minutes == 0.0
    spec["schedule"]["max_minutes"] = 2.5
    assert distill_config_from_spec(spec, output_dir="runs/x", teacher_path=None).train.max_minutes == 2.5
    del spec["schedule"]["max_minutes"]  # a spec stored before the field existed
    assert distill_config_from_spec(spec, output_dir="runs/x", teacher_path=None).train.max_minutes == 0.0


def test_toy2d_spec_keeps_the_workers_eval_defaults():
    spec = JobCreate(name="d", teacher={"uri": "builtin:toy2d"}).model_dump(mode="json")
    del spec["eval"]  # a spec stored before the service had an eval section
    cfg = distill_config_from_spec(spec, output_dir="runs/x", teacher_path=None)
    assert cfg.task == "toy2d" and (cfg.eval.num_samples, cfg.eval.teacher_steps) == (2000, [1, 4, 32])


def test_stored_teacher_row_labels_the_shipped_teachers_gpu_evaluation():
    from rcm_core.pipeline import SHIPPED_SHAPES_TEACHER
    from rcm_core.teacher import read_teacher_meta
    from workers.evaluation import stored_teacher_row

    meta = read_teacher_meta(SHIPPED_SHAPES_TEACHER)
    row = stored_teacher_row(meta, 2.0)
    assert row["stored"] and row["steps"] == 50 and "CFG 2" in row["model"] and "H100" in row["model"]
    assert row["overall"] == 0.94 and row["held_out"] == 0.826 and row["two_object"] == 0.833
    assert "CFG 1.5" in stored_teacher_row(meta, 1.4)["model"]  # the nearest stored guidance scale
    assert stored_teacher_row({"training": {}}, 2.0) is None
