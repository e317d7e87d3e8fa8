"""The JSON contract: every example job spec the service accepts converts into rcm_core's configs (one function
each way, workers/spec.py); presets own the defaults; the worker's checks of a job's prompt file."""

import dataclasses
import json
from pathlib import Path

import pytest

from rcm_core.config import ConfigError, LossConfig, OptimConfig, shapes_rcm, toy2d_rcm
from service.schemas import JobCreate
from workers.spec import SECTIONS, WORKER_FIELDS, effective_spec, job_config

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "jobs").glob("*.json"))


def _stored(payload: dict) -> dict:
    """What the service stores: the fields the user set."""
    return JobCreate.model_validate(payload).model_dump(mode="json", exclude_unset=True)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_spec_converts_and_round_trips(path):
    spec = _stored(json.loads(path.read_text()))
    job = job_config(spec, output_dir="/tmp/x", teacher_path="/tmp/t.safetensors")
    effective = effective_spec(job)
    for section, fields in spec.items():  # every field the user set runs as set, under the same name
        if section in ("name", "tracking"):
            continue
        for key, value in fields.items():
            if isinstance(value, dict):  # a nested section (student.lora): what was set, plus its defaults
                assert value.items() <= effective[section][key].items(), (section, key)
            else:
                assert effective[section][key] == value, (section, key)
    again = job_config(effective, output_dir="/tmp/x", teacher_path="/tmp/t.safetensors")
    assert again == job  # and back: config -> spec -> config is the identity


def test_lora_spec_converts_to_the_student_config():
    spec = _stored(json.loads((EXAMPLES[0].parent / "rcm-wan-lora.json").read_text()))
    lora = job_config(spec, output_dir="x", teacher_family="wan2.1").distill.student.lora
    assert (lora.rank, lora.alpha, lora.dropout) == (64, 64.0, 0.0) and lora.target_modules[-1] == "ffn.net.2"
    spec["student"]["lora"]["rank"] = 0  # past the schema (a stored spec is trusted), the worker still refuses it
    with pytest.raises(ConfigError, match=r"^student.lora: rank must be in \[1, 1024\]"):
        job_config(spec, output_dir="x")


def test_examples_exist():
    assert len(EXAMPLES) >= 3


def test_every_schema_field_has_one_home():
    """Each user-settable field of the REST schema lands in exactly one dataclass field of the same name."""
    for section, targets in SECTIONS.items():
        model = JobCreate.model_fields[section].annotation
        for key in model.model_fields:
            homes = [name for name, cls in targets.items() if key in {f.name for f in dataclasses.fields(cls)}]
            assert len(homes) == 1 or key in WORKER_FIELDS.get(section, ()), (section, key, homes)


def test_unset_fields_come_from_the_task_preset():
    toy = job_config(_stored({"name": "d", "teacher": {"uri": "builtin:toy2d"}}), output_dir="runs/x")
    assert toy.distill.loss == toy2d_rcm().loss and toy.distill.optim == toy2d_rcm().optim
    shapes = job_config(
        _stored({"name": "s", "teacher": {"uri": "builtin:shapes"}, "data": {"dataset": "shapes"}}), output_dir="x"
    )
    preset = shapes_rcm()
    assert shapes.distill.loss == preset.loss and shapes.distill.optim == preset.optim  # critic_ratio 2, lr 1e-4
    assert shapes.distill.teacher.guidance_scale == 2.0 and shapes.distill.eval == preset.eval
    assert (shapes.distill.eval.num_samples, shapes.distill.eval.teacher_steps) == (126, [4])


def test_shapes_example_states_only_what_differs_from_the_preset():
    spec = json.loads((EXAMPLES[0].parent / "rcm-shapes.json").read_text())
    preset = shapes_rcm()
    for key, value in spec.get("method", {}).items():
        home = getattr(preset.loss, key, None) if hasattr(preset.loss, key) else getattr(preset.optim, key)
        assert value != home, f"method.{key} restates the shapes preset"


def test_method_fields_are_declared_once_per_layer():
    """dmd_weight & co.: the REST schema (bounds) and one dataclass (default); no key list in between."""
    spec_source = (Path(__file__).parents[2] / "workers" / "spec.py").read_text()
    for name in ("dmd_weight", "critic_ratio", "fake_lr"):
        assert f'"{name}"' not in spec_source
    assert {"dmd_weight", "critic_ratio"} <= {f.name for f in dataclasses.fields(LossConfig)}
    assert "fake_lr" in {f.name for f in dataclasses.fields(OptimConfig)}


def test_bad_values_name_the_spec_field():
    spec = _stored({"name": "d", "teacher": {"uri": "builtin:toy2d"}, "method": {"scm_weight": 0}})
    spec["method"]["dmd_weight"] = 0  # as the service could not know (a preset with lambda 0 would do the same)
    with pytest.raises(ConfigError, match="^method: scm_weight and dmd_weight are both 0"):
        job_config(spec, output_dir="x")
    with pytest.raises(ConfigError, match=r"^method\.bogus: unknown field"):
        job_config({"method": {"bogus": 1}}, output_dir="x")
    with pytest.raises(ConfigError, match=r"schedule.batch_size \(3\) must be divisible by resources.fsdp_degree"):
        job_config({"schedule": {"batch_size": 3}, "resources": {"num_workers": 2, "fsdp_degree": 2}}, output_dir="x")


def test_resources_convert_under_the_same_names():
    job = job_config(
        _stored(
            {
                "name": "p",
                "teacher": {"uri": "builtin:shapes"},
                "data": {"dataset": "shapes"},
                "resources": {"num_workers": 2, "cp_degree": 2, "fsdp_degree": 1, "activation_checkpointing": "full"},
            }
        ),
        output_dir="x",
    )
    p = job.parallel
    assert (p.fsdp_degree, p.cp_degree, p.activation_checkpointing, job.num_workers) == (1, 2, "full", 2)


def test_prompt_file_reaches_the_config():
    spec = _stored(
        {
            "name": "p",
            "teacher": {"uri": "s3://ckpt/t.safetensors"},
            "data": {"dataset": "shapes", "prompt_file_uri": "p.txt"},
        }
    )
    job = job_config(spec, output_dir="runs/x", prompt_file="/tmp/w/prompts.txt")
    assert job.distill.data.dataset == "shapes" and job.distill.data.prompt_file == "/tmp/w/prompts.txt"
    assert effective_spec(job)["data"]["prompt_file_uri"] == "p.txt"


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
    from workers import storage
    from workers.entrypoint import check_inputs

    monkeypatch.setenv("RCM_PROMPT_DIR", str(tmp_path))
    (tmp_path / "bad.txt").write_text("# captions\na photo of a red circle\na photo of a purple dragon\n")
    spec = _stored(
        {
            "name": "p",
            "teacher": {"uri": "s3://ckpt/t.safetensors"},
            "data": {"dataset": "shapes", "prompt_file_uri": "bad.txt"},
        }
    )
    with pytest.raises(ConfigError, match=r"data\.prompt_file_uri bad\.txt, line 3: not a caption") as err:
        check_inputs(spec)
    assert "dragon" not in str(err.value) and str(tmp_path) not in str(err.value)  # no file contents, no paths
    spec["data"]["prompt_file_uri"] = "gone.txt"
    with pytest.raises(storage.PromptFileUnavailable, match="gone.txt: no such file"):
        check_inputs(spec)


def test_eval_fields_override_the_shapes_preset():
    spec = _stored({"name": "s", "teacher": {"uri": "builtin:shapes"}, "data": {"dataset": "shapes"}})
    spec["eval"] = {"num_samples": 16, "diversity_samples": 4, "teacher_steps": [2, 4]}
    e = job_config(spec, output_dir="x").distill.eval
    assert (e.num_samples, e.diversity_samples, e.teacher_steps) == (16, 4, [2, 4])
    assert e.student_mid_times == [1.1, 0.8, 0.5]
    spec["eval"]["student_mid_times"] = [1.3, 1.0, 0.6]
    assert job_config(spec, output_dir="x").distill.eval.student_mid_times == [1.3, 1.0, 0.6]


def test_schedule_max_minutes_becomes_the_training_time_budget():
    spec = _stored({"name": "s", "teacher": {"uri": "builtin:toy2d"}})
    assert job_config(spec, output_dir="x").distill.train.max_minutes == 0.0
    spec["schedule"] = {"max_minutes": 2.5}
    assert job_config(spec, output_dir="x").distill.train.max_minutes == 2.5


def test_stored_teacher_row_labels_the_shipped_teachers_gpu_evaluation():
    from rcm_core.tasks.shapes import SHIPPED_TEACHER, stored_teacher_row
    from rcm_core.teacher import read_teacher_meta

    meta = read_teacher_meta(SHIPPED_TEACHER)
    row = stored_teacher_row(meta, 2.0)
    assert row["stored"] and row["steps"] == 50 and "CFG 2" in row["model"] and "H100" in row["model"]
    assert row["overall"] == 0.94 and row["held_out"] == 0.826 and row["two_object"] == 0.833
    assert "CFG 1.5" in stored_teacher_row(meta, 1.4)["model"]  # the nearest stored guidance scale
    assert stored_teacher_row({"training": {}}, 2.0) is None


def test_diffusers_teacher_defaults_come_from_its_family():
    """A diffusers teacher's preset depends on its family (read from config.json by the entrypoint when the spec
    leaves teacher.family out): Wan's guidance 5 and the published Wan recipe; a value the user set wins."""
    from rcm_core.config import diffusers_rcm

    payload = {
        "name": "w",
        "teacher": {"uri": "s3://ckpt/tenants/demo/wan/transformer/"},
        "data": {"dataset": "teacher-synthetic", "latent_shape": [16, 1, 8, 8]},
    }
    job = job_config(_stored(payload), output_dir="x", teacher_family="wan2.1")
    assert job.distill.task == "diffusers" and job.distill.teacher.family == "wan2.1"
    assert job.distill.teacher.guidance_scale == 5.0 and job.distill.optim == diffusers_rcm().optim
    assert (job.distill.optim.lr, job.distill.loss.p_mean, job.distill.loss.critic_ratio) == (2e-6, 0.7, 4)
    assert effective_spec(job)["teacher"]["family"] == "wan2.1"
    payload["teacher"] |= {"family": "wan2.1", "guidance_scale": 3.0}
    assert job_config(_stored(payload), output_dir="x").distill.teacher.guidance_scale == 3.0
    with pytest.raises(ConfigError, match="teacher.family: must be one of"):
        job_config(
            {**_stored(payload), "teacher": {"uri": payload["teacher"]["uri"]}}, output_dir="x", teacher_family="x"
        )


def test_export_section_reaches_the_worker_and_round_trips():
    export = {"registered_model_name": "acme.wan-4step", "max_shard_size": "200MB", "dtype": "bfloat16"}
    spec = _stored({"name": "e", "teacher": {"uri": "builtin:toy2d"}, "export": export})
    job = job_config(spec, output_dir="/tmp/x")
    assert (job.registered_model_name, job.max_shard_size) == ("acme.wan-4step", "200MB")
    assert effective_spec(job)["export"] == export
    assert job_config(effective_spec(job), output_dir="/tmp/x") == job
    default = job_config(_stored({"name": "e", "teacher": {"uri": "builtin:toy2d"}}), output_dir="/tmp/x")
    assert (default.registered_model_name, default.max_shard_size, default.export_dtype) == (None, "5GB", "float32")
