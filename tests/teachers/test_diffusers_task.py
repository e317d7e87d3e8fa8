"""The diffusers task (rcm_core.tasks.diffusers) in one process, for both families on tiny random models saved
with save_pretrained: the pool's x0 are the teacher's own CFG Euler samples for the placeholder prompts, a few
rCM steps run through the one Trainer, the report compares every sampler with the teacher's reference, and the
export is a diffusers folder that the family's class loads with from_pretrained (the student's weights under the
teacher's keys). The same path through the service: tests/service/test_e2e_stack.py (Wan, 2 workers, CP 2)."""

import math

import pytest
import torch
from safetensors.torch import load_file

from rcm_core import pipeline
from rcm_core.config import ConfigError, config_from_dict
from rcm_core.export import read_sampler_record, sample_student
from rcm_core.models.flow import FlowModel, guided_f
from rcm_core.sampling import sample_euler
from rcm_core.tasks import eval_seed, final_report, get_task, student_info
from rcm_core.tasks.diffusers import check_teacher_config, placeholder_conditions
from rcm_core.teachers import FAMILIES as FAMILY_OF

FAMILIES = {  # family -> (diffusers class, saver, latent [C, F, H, W])
    "wan2.1": ("WanTransformer3DModel", "tests.teachers.wan_tiny:save_wan_tiny", [4, 2, 4, 4]),
    "cosmos-predict2": ("CosmosTransformer3DModel", "tests.teachers.cosmos_tiny:save_tiny_cosmos", [4, 2, 8, 8]),
}


def _save(target: str, path):
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(path)


def _cfg(teacher, out, latent, family):
    spec = {
        "teacher": {"path": str(teacher)},
        "data": {
            "dataset": "teacher-synthetic",
            "latent_shape": latent,
            "text_tokens": 6,
            "num_prompts": 3,
            "sample_steps": 2,
        },
        "loss": {"critic_ratio": 1},
        "train": {"steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 2, "output_dir": str(out)},
        "eval": {"num_samples": 10, "teacher_steps": [3]},
    }
    return config_from_dict(spec, base=get_task("diffusers").preset(family))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_diffusers_task_distils_and_exports_a_diffusers_student(tmp_path, family):
    import diffusers

    cls_name, saver, latent = FAMILIES[family]
    teacher_dir = _save(saver, tmp_path / "transformer")
    cfg = _cfg(teacher_dir, tmp_path / "run", latent, family)
    task = get_task("diffusers")
    distiller = pipeline.distill(cfg)
    assert distiller.step == 2 and cfg.teacher.guidance_scale == (5.0 if family == "wan2.1" else 8.0)
    data = distiller.task
    # the pool: the teacher's own CFG Euler samples (3 prompts, drawn in chunks of the batch size, padded)
    teacher_net, meta, _ = pipeline.get_teacher(cfg)
    teacher = FlowModel(teacher_net, "rf").eval()
    assert meta["family"] == family
    chunk = torch.tensor([2, 0])  # the second chunk: the last prompt, padded by repeating the first
    cond = {k: v[chunk] for k, v in data.cond.items()}
    want = sample_euler(
        lambda x, t: guided_f(teacher, x, t, cond, data.null_cond(2), cfg.teacher.guidance_scale),
        data.pool_noise[chunk],
        cfg.data.sample_steps,
    )
    assert torch.equal(data.x0[2], want[0])  # same model, inputs and batch: bit for bit
    # the report: the teacher at the reference's step count reproduces it; every student row is measured
    rows, metrics = final_report(cfg, teacher, distiller.ema.model.eval(), data, meta, tmp_path / "samples.png")
    assert [(r["model"].split(" (")[0], r["steps"]) for r in rows] == [("teacher", 3)] + [
        ("student", s) for s in (1, 2, 4)
    ]
    assert rows[0]["rel_l2"] < 1e-5 and all(r["rel_l2"] > 0 for r in rows[1:])
    assert set(metrics) == {f"eval/{s}step/{m}" for s in (1, 2, 4) for m in ("rel_l2", "mse")}
    assert (tmp_path / "samples.png").read_bytes().startswith(b"\x89PNG")
    # the export: from_pretrained of the family's diffusers class reads the student's weights back (sharded)
    state = {k: v.contiguous() for k, v in distiller.ema.model.net.state_dict().items()}
    info = student_info(cfg, "rf", meta) | {"max_shard_size": "30KB"}
    out = tmp_path / "export"
    task.write_student(out, state, info, meta)
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    module = getattr(diffusers, cls_name).from_pretrained(str(out / "transformer"))
    loaded = module.state_dict()
    assert loaded.keys() == state.keys() == teacher_net.state_dict().keys()
    for k, v in state.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    assert any(not torch.equal(state[k], teacher_net.state_dict()[k]) for k in state)
    # the loaded student + the recorded sampler reproduce the evaluation's samples (samples.safetensors)
    record = read_sampler_record(out)
    assert record["eval_seed"] == eval_seed(cfg) and record["schedules"]["4"]["trigflow_times"][0] == math.pi / 2
    evaluated = load_file(str(tmp_path / "samples.safetensors"))
    student = FlowModel(FAMILY_OF[family].build_net(module), "rf").eval()
    cond = {"tokens": evaluated["tokens"], "mask": evaluated["mask"]}
    for steps in (1, 2, 4):
        times = record["schedules"][str(steps)]["trigflow_times"]
        x = sample_student(student, cond, evaluated["noise"], times, record["eval_seed"])
        torch.testing.assert_close(x, evaluated[f"student_{steps}step"], rtol=1e-5, atol=1e-6)
    card = (out / "README.md").read_text()
    assert cls_name in card and "eval/4step/rel_l2" not in card  # metrics come from a job (none here)


def test_placeholder_prompts_are_zero_past_their_length_and_seeded():
    a = placeholder_conditions(5, 7, 3, generator=torch.Generator().manual_seed(1))
    b = placeholder_conditions(5, 7, 3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["mask"][:, 0].all() and (a["tokens"][~a["mask"]] == 0).all()
    assert (a["tokens"][a["mask"]] != 0).all()


def test_worker_check_names_the_field(tmp_path):
    from tests.teachers.wan_tiny import wan_tiny_config

    config = {"_class_name": "WanTransformer3DModel", **wan_tiny_config()}
    config["patch_size"] = list(config["patch_size"])
    cfg = _cfg(tmp_path, tmp_path, [4, 2, 4, 4], "wan2.1")
    assert check_teacher_config(config, cfg, 2).name == "wan2.1"
    with pytest.raises(
        ConfigError, match=r"^resources.cp_degree: .*num_heads \(2\) is not divisible by cp_degree \(4\)"
    ):
        check_teacher_config(config, cfg, 4)
    with pytest.raises(ConfigError, match=r"^data.latent_shape: 4 channels, the teacher takes in_channels=8"):
        check_teacher_config({**config, "in_channels": 8}, cfg, 1)
