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


def _supports_prompt_files() -> bool:
    """The rcm_core side of the prompt-file contract: data.dataset 'shapes' and data.prompt_file."""
    from rcm_core.config import ConfigError, config_from_dict

    try:
        config_from_dict({"data": {"dataset": "shapes", "prompt_file": "p.txt"}})
    except ConfigError:
        return False
    return True


@pytest.mark.skipif(
    not _supports_prompt_files(), reason="rcm_core.config has no data.dataset 'shapes' / data.prompt_file yet"
)
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
    with pytest.raises(ConfigError, match=r"prompt file bad\.txt, line 3: .*purple dragon"):
        check_inputs(spec)
    spec["data"]["prompt_file_uri"] = "gone.txt"
    with pytest.raises(storage.PromptFileUnavailable, match="gone.txt: no such file"):
        check_inputs(spec)
