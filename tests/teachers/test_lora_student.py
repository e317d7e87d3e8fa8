"""LoRA students (student.lora; rcm_core.teachers.lora) on tiny random diffusers teachers, in one process through the
one Trainer (task level: an e2e job through the stack would add a stack start and ~40 s of Ray job to CI for the
same code path; tests/service/test_lora_submission.py covers the spec at submission):
- training changes the adapters alone: every base weight of the student and its EMA stays bit-identical to the
  teacher's, the optimizer holds state for adapters only, the fake score trains in full;
- the sCM tangent through peft's LoRA layers equals central differences (float64);
- the checkpoint holds the adapters (not the base weights) and a resume from it reproduces the next step exactly;
- the export is diffusers' LoRA file, far smaller than a full student export, and the teacher transformer plus
  `load_lora_adapter` of it gives the job's student outputs (diffusers' own forward, and the job's evaluation
  samples through the few-step sampler).
"""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rcm_core import pipeline
from rcm_core.checkpoint import DirectoryStore, load_checkpoint
from rcm_core.cli import main
from rcm_core.config import ConfigError, LoraConfig, config_from_dict, load_config
from rcm_core.export import LORA_WEIGHTS, TRANSFORMER_DIR, config_sha256, read_sampler_record, sample_student
from rcm_core.losses.scm import scm_loss
from rcm_core.models.flow import FlowModel
from rcm_core.tasks import eval_seed, final_report, get_task, student_info
from rcm_core.tasks.diffusers import check_teacher_config
from rcm_core.teachers import FAMILIES
from rcm_core.teachers.lora import is_adapter, with_adapters
from rcm_core.trainer import Trainer
from tests.teachers.cosmos_tiny import save_tiny_cosmos
from tests.teachers.wan_tiny import build_wan_tiny, save_wan_tiny, wan_inputs

LORA = {"rank": 4, "alpha": 8.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]}
LATENT = [4, 2, 4, 4]


def _cfg(teacher, out, *, lora=LORA, family="wan2.1", latent=LATENT):
    spec = {
        "teacher": {"path": str(teacher)},
        "student": {"lora": lora},
        "data": {
            "dataset": "teacher-synthetic",
            "latent_shape": latent,
            "text_tokens": 6,
            "num_prompts": 3,
            "sample_steps": 2,
        },
        "loss": {"critic_ratio": 1, "tangent_warmup_steps": 1},
        "optim": {"lr": 1e-3},  # the preset's 2e-6 would move zero-initialised B too little to see in outputs
        "train": {"steps": 3, "batch_size": 2, "log_every": 1, "checkpoint_every": 1, "output_dir": str(out)},
        "eval": {"num_samples": 10, "teacher_steps": [3]},
    }
    return config_from_dict(spec, base=get_task("diffusers").preset(family))


def _base_name(name: str) -> str:
    """A LoRA student's base-weight name -> the teacher's (peft moves W to <linear>.base_layer.weight)."""
    return name.replace(".base_layer.", ".")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 rCM steps (sCM + DMD) of a LoRA student of the tiny Wan, checkpoints every step."""
    tmp = tmp_path_factory.mktemp("lora")
    teacher_dir = save_wan_tiny(tmp / "transformer")
    cfg = _cfg(teacher_dir, tmp / "run")
    torch.manual_seed(cfg.train.seed)
    teacher_net, meta, _ = pipeline.get_teacher(cfg)
    distiller = pipeline.build_distiller(cfg, teacher_net, meta)
    result = Trainer(distiller, DirectoryStore(tmp / "run" / "checkpoints")).run()
    assert result.status == "completed" and distiller.step == 3
    return {"tmp": tmp, "teacher_dir": teacher_dir, "cfg": cfg, "distiller": distiller, "meta": meta, "result": result}


def test_lora_student_trains_the_adapters_alone(run):
    d = run["distiller"]
    teacher = {k: v for k, v in FAMILIES["wan2.1"].build_net(build_wan_tiny()).state_dict().items()}
    for model in (d.student.net, d.ema.model.net):
        state = model.state_dict()
        adapters = {k for k in state if is_adapter(k)}
        assert len(adapters) == 2 * 10 * 2  # A and B of 10 linears (to_q .. to_out.0 in both attentions) x 2 blocks
        assert {_base_name(k) for k in state if k not in adapters} == set(teacher)
        for k in set(state) - adapters:  # base weights: the teacher's, bit for bit, after 3 optimizer steps
            assert torch.equal(state[k], teacher[_base_name(k)]), k
        assert all(state[k].abs().max() > 0 for k in adapters if ".lora_B." in k)  # B started at zero
    trained = [n for n, p in d.student.named_parameters() if p.requires_grad]
    assert trained and all(is_adapter(n) for n in trained)
    # in one process the student and its EMA hold the teacher's own base tensors (no copies); the teacher's
    # modules carry no adapters
    base = {n: p for n, p in d.teacher.net.named_parameters()}
    for model in (d.student.net, d.ema.model.net):
        for n, p in model.named_parameters():
            assert (p is base[_base_name(n)]) if not is_adapter(n) else not any(p is q for q in base.values()), n
    assert not any(is_adapter(n) for n in base)
    ema_adapters = {n: p for n, p in d.ema.model.net.named_parameters() if is_adapter(n)}
    assert all(p is not dict(d.student.net.named_parameters())[n] for n, p in ema_adapters.items())
    params = {id(p): n for n, p in d.student.named_parameters()}
    assert sorted(params[id(p)] for p in d.opt.state) == sorted(trained)  # optimizer state: adapters only
    # the fake score stays a full network and trains in full
    fake = d.fake.net.state_dict()
    assert not any(is_adapter(k) for k in fake)
    assert any(not torch.equal(fake[k], teacher[k]) for k in teacher)


def test_lora_checkpoint_holds_the_adapters_and_resumes_exactly(run):
    d, cfg, tmp = run["distiller"], run["cfg"], run["tmp"]
    step1 = tmp / "run" / "checkpoints" / "step-1"
    entries = dcp.FileSystemReader(str(step1)).read_metadata().state_dict_metadata
    student_keys = {k.removeprefix("app.student.") for k in entries if k.startswith("app.student.")}
    ema_keys = {k.removeprefix("app.ema.model.") for k in entries if k.startswith("app.ema.model.")}
    adapters = {n for n, _ in d.student.named_parameters() if is_adapter(n)}
    assert student_keys == adapters and ema_keys == adapters  # no base weight in the checkpoint

    def nbytes(prefixes):
        return sum(
            m.size.numel() * m.properties.dtype.itemsize
            for k, m in entries.items()
            if k.startswith(prefixes) and hasattr(m, "size")
        )

    lora_bytes = nbytes(("app.student.", "app.ema.", "app.opt."))
    full_params = sum(p.numel() for n, p in d.student.named_parameters() if not is_adapter(n))
    adapter_params = sum(p.numel() for n, p in d.student.named_parameters() if is_adapter(n))
    # student + EMA + AdamW's two moments, of the adapters alone (plus the optimizer's step counters)
    assert 4 * 4 * adapter_params <= lora_bytes < 4 * 4 * adapter_params + 1024
    print(f"LoRA student state in the checkpoint: {lora_bytes} bytes; a full student's: {16 * full_params} bytes")
    # a fresh Distiller resumed from step 1 reproduces steps 2 and 3 bit for bit
    teacher_net, meta, _ = pipeline.get_teacher(cfg)
    resumed = pipeline.build_distiller(cfg, teacher_net, meta)
    load_checkpoint(resumed, step1)
    losses = [float(resumed.train_step()["loss"]) for _ in range(2)]
    assert losses == run["result"].losses[1:]
    for k, v in d.student.net.state_dict().items():
        assert torch.equal(resumed.student.net.state_dict()[k], v), k


def test_preview_loads_a_lora_students_ema_from_its_checkpoint(run):
    """What a sample request (`POST /v1/jobs/{id}/samples`, rcm_core.preview) loads from a LoRA job's checkpoint:
    the teacher's network with the job's adapters and the checkpoint's averaged adapters; without the job's LoRA
    settings the checkpoint is refused (its EMA holds parameters the bare teacher lacks), not half-loaded."""
    from rcm_core import preview

    d, cfg, tmp = run["distiller"], run["cfg"], run["tmp"]
    last = tmp / "run" / "checkpoints" / "step-3"
    teacher_net, _, _ = pipeline.get_teacher(cfg)
    model = preview.load_ema_student(last, teacher_net, "rf", cfg.student.lora)
    got, want = model.state_dict(), d.ema.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "the preview's weights are not the job's EMA student"
    assert any(is_adapter(k) and ".lora_B." in k and got[k].abs().max() > 0 for k in got)
    with pytest.raises(ConfigError, match="extra"):
        preview.load_ema_student(last, teacher_net, "rf")


@pytest.fixture(scope="module")
def exported(run):
    """The EMA student's final report (samples.safetensors) and its export, as the worker writes them."""
    d, cfg, meta, tmp = run["distiller"], run["cfg"], run["meta"], run["tmp"]
    teacher_net, _, _ = pipeline.get_teacher(cfg)
    teacher = FlowModel(teacher_net, "rf").eval()
    final_report(cfg, teacher, d.ema.model.eval(), d.task, meta, tmp / "samples.png")  # writes samples.safetensors
    out = tmp / "export"
    out.mkdir()
    state = {k: v.contiguous() for k, v in d.ema.model.net.state_dict().items()}
    sha = config_sha256(run["teacher_dir"] / "config.json")
    info = student_info(cfg, "rf", meta) | {"job_id": "job-1", "teacher": {"uri": "s3://b/t/", "config_sha256": sha}}
    get_task("diffusers").write_student(out, state, info, meta)
    return {"out": out, "state": state, "info": info, "teacher_net": teacher_net}


def test_lora_export_is_small_and_reloads_in_diffusers_to_the_students_outputs(run, exported):
    from diffusers import WanTransformer3DModel

    cfg, meta, tmp = run["cfg"], run["meta"], run["tmp"]
    out, state, info, teacher_net = exported["out"], exported["state"], exported["info"], exported["teacher_net"]
    task = get_task("diffusers")
    ema = run["distiller"].ema.model.eval()
    assert not (out / TRANSFORMER_DIR).exists()
    weights = out / LORA_WEIGHTS
    with safe_open(str(weights), "pt") as f:
        keys, header = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys == {"transformer." + k.replace(".default.", ".") for k in state if is_adapter(k)}
    assert header["transformer.r"] == 4 and header["transformer.lora_alpha"] == 8.0
    # the size against a full student export of the same teacher
    full = tmp / "full-export"
    full.mkdir()
    task.write_student(full, teacher_net.state_dict(), {**info, "lora": None}, meta)
    full_bytes = sum(f.stat().st_size for f in (full / TRANSFORMER_DIR).iterdir())
    print(f"LoRA export {weights.stat().st_size} bytes; full student export {full_bytes} bytes")
    assert weights.stat().st_size < full_bytes / 2
    card = (out / "README.md").read_text()
    assert "LoRA of the teacher" in card and "s3://b/t/" in card and "load_lora_adapter" in card
    assert "rank\n4, alpha 8," in card and "--teacher <the teacher" in card
    # export.dtype bfloat16: the adapters stored in bf16, half the tensor bytes
    half = tmp / "bf16-export"
    half.mkdir()
    task.write_student(half, state, {**info, "dtype": "bfloat16"}, meta)
    halved = load_file(str(half / LORA_WEIGHTS))
    assert halved.keys() == keys and all(v.dtype == torch.bfloat16 for v in halved.values())
    header_bytes = weights.stat().st_size - sum(4 * v.numel() for v in halved.values())  # keys and peft config
    bf16_bytes = header_bytes + sum(2 * v.numel() for v in halved.values())
    assert abs((half / LORA_WEIGHTS).stat().st_size - bf16_bytes) <= 64  # the header: dtype names, padding
    # the teacher transformer + load_lora_adapter: diffusers' own forward gives the student's velocity
    module = WanTransformer3DModel.from_pretrained(str(run["teacher_dir"]))
    module.load_lora_adapter(str(out), prefix="transformer", weight_name=LORA_WEIGHTS)
    x, t, cond = wan_inputs(dtype=torch.float32)
    sigma = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    with torch.no_grad():
        tokens = cond["tokens"] * cond["mask"][..., None]
        got = module(hidden_states=x, timestep=1000.0 * sigma, encoder_hidden_states=tokens, return_dict=False)[0]
        ema.net.match_diffusers_precision = True
        want = ema.net(x, sigma, cond)
        ema.net.match_diffusers_precision = False
        plain = teacher_net(x, sigma, cond)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).norm() / plain.norm() > 1e-3  # the adapters change the output: the check sees them
    # ... and the project's net over it + the recorded sampler reproduce the job's evaluation samples
    record = read_sampler_record(out)
    evaluated = load_file(str(tmp / "samples.safetensors"))
    student = FlowModel(FAMILIES["wan2.1"].build_net(module), "rf").eval()
    cond = {"tokens": evaluated["tokens"], "mask": evaluated["mask"]}
    for steps in (1, 2, 4):
        times = record["schedules"][str(steps)]["trigflow_times"]
        x = sample_student(student, cond, evaluated["noise"], times, record["eval_seed"])
        torch.testing.assert_close(x, evaluated[f"student_{steps}step"], rtol=1e-5, atol=1e-6)
    assert record["eval_seed"] == eval_seed(cfg)
    # `rcm sample --student <LoRA export> --teacher <teacher folder>`: the same, from the command line
    sampled = tmp / "sampled"
    argv = ["sample", "--student", str(out), "--teacher", str(run["teacher_dir"]), "--steps", "4"]
    assert main([*argv, "--prompt-embeds", str(tmp / "samples.safetensors"), "--out", str(sampled)]) == 0
    got = load_file(str(sampled / "latents.safetensors"))["latents"]
    torch.testing.assert_close(got, evaluated["student_4step"], rtol=1e-5, atol=1e-6)


def test_sample_lora_export_needs_its_teacher(run, exported, tmp_path, capsys):
    out = exported["out"]
    embeds = str(run["tmp"] / "samples.safetensors")
    other = save_wan_tiny(tmp_path / "other", num_layers=1)  # another teacher: its config.json differs
    cases = [
        (["--student", str(out)], "--teacher: the student is a LoRA (pytorch_lora_weights.safetensors)"),
        (["--student", str(out), "--teacher", str(other)], "is not the teacher this LoRA was trained on"),
        (["--student", str(run["teacher_dir"]), "--teacher", str(other)], "--teacher: only for a LoRA export"),
    ]
    for argv, says in cases:
        assert main(["sample", *argv, "--prompt-embeds", embeds, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err


def test_cosmos_lora_export_reloads_with_load_lora_adapter(tmp_path):
    from diffusers import CosmosTransformer3DModel

    teacher_dir = save_tiny_cosmos(tmp_path / "transformer")
    lora = {"rank": 2, "alpha": 3.0, "target_modules": ["attn1.to_q", "attn2.to_v", "ff.net.2"]}
    cfg = _cfg(teacher_dir, tmp_path / "run", lora=lora, family="cosmos-predict2", latent=[4, 2, 8, 8])
    net, meta = get_task("diffusers").load_teacher(teacher_dir)
    student = with_adapters(net, LoraConfig(**lora))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if is_adapter(name):
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(len(name)))
    out = tmp_path / "export"
    out.mkdir()
    get_task("diffusers").write_student(out, student.state_dict(), student_info(cfg, "rf", meta), meta)
    module = CosmosTransformer3DModel.from_pretrained(str(teacher_dir))
    module.load_lora_adapter(str(out), prefix="transformer", weight_name=LORA_WEIGHTS)
    reloaded = FAMILIES["cosmos-predict2"].build_net(module)
    # diffusers names its adapter default_0 (peft's default is taken by nothing here, but it numbers them)
    loaded = {k.replace(".default_0.", ".default."): v for k, v in reloaded.state_dict().items() if is_adapter(k)}
    mine = {k: v for k, v in student.state_dict().items() if is_adapter(k)}
    assert loaded.keys() == mine.keys() and len(mine) == 2 * 3 * len(student.transformer_blocks)
    assert all(torch.equal(loaded[k], v) for k, v in mine.items())
    assert module.peft_config["default_0"].lora_alpha == 3.0 and module.peft_config["default_0"].r == 2


def test_scm_tangent_through_the_adapters_equals_central_differences():
    from tests.teachers.test_wan import FD_TOL, _central_difference, _richardson

    net = FAMILIES["wan2.1"].build_net(build_wan_tiny(dtype=torch.float64))
    student = FlowModel(with_adapters(net, LoraConfig(**LORA)), "rf")
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".lora_B." in name:  # B = 0 at init would leave the adapters out of the tangent
                p.normal_(std=0.3, generator=torch.Generator().manual_seed(len(name)))
    x, t, cond = wan_inputs()
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        _, tangent_x = torch.func.jvp(lambda a: student(a, t, cond), (x,), (v,))
        torch.testing.assert_close(tangent_x, _central_difference(lambda a: student(a, t, cond), x, v), **FD_TOL)
        ones = torch.ones_like(t)
        _, tangent_t = torch.func.jvp(lambda tt: student(x, tt, cond), (t,), (ones,))
        torch.testing.assert_close(tangent_t, _richardson(lambda tt: student(x, tt, cond), t, ones), **FD_TOL)
        # the adapters are in the tangent: the teacher's (no adapters) differs
        teacher = FlowModel(net, "rf")
        _, teacher_x = torch.func.jvp(lambda a: teacher(a, t, cond), (x,), (v,))
    assert (tangent_x - teacher_x).norm() / teacher_x.norm() > 1e-2
    # sCM's gradient reaches the adapters only
    teacher_fn = lambda xx, tt: teacher(xx, tt, cond)  # noqa: E731
    loss, _ = scm_loss(student, teacher_fn, x, cond, t=t, eps=v, r=1.0, config=get_task("diffusers").preset().loss)
    loss.backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert all((g is not None) == is_adapter(n) for n, g in grads.items())
    assert all(g.abs().max() > 0 for g in grads.values() if g is not None)


def test_lora_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^config: student.lora: LoRA students need a diffusers teacher"):
        config_from_dict({"student": {"lora": LORA}})
    for field, value, says in (
        ("rank", 0, "rank must be in"),
        ("alpha", -1, "alpha must be in"),
        ("dropout", 1.0, "dropout must be in"),
        ("target_modules", [], "target_modules must be a non-empty list"),
    ):
        with pytest.raises(ConfigError, match=rf"^student.lora: {says}"):
            _cfg(tmp_path, tmp_path, lora={**LORA, field: value})
    with pytest.raises(ConfigError, match=r"^student.lora.target_modules\[1\]: expected a string"):
        _cfg(tmp_path, tmp_path, lora={**LORA, "target_modules": ["to_q", 3]})
    # a name the family does not offer (the time path, a typo), refused before any training
    teacher_dir = save_wan_tiny(tmp_path / "transformer")
    for bad in ("time_proj", "to_qq"):
        cfg = _cfg(teacher_dir, tmp_path / "run", lora={**LORA, "target_modules": ["to_q", bad]})
        teacher_net, meta, _ = pipeline.get_teacher(cfg)
        with pytest.raises(ConfigError, match=rf"^student.lora.target_modules\[1\]: '{bad}' is not a block linear"):
            pipeline.build_distiller(cfg, teacher_net, meta)
        with pytest.raises(ConfigError, match=rf"^student.lora.target_modules\[1\]: '{bad}'"):
            check_teacher_config(meta["config"], cfg, 1)  # the worker entrypoint's check, before Ray Train starts
    # the YAML config of `rcm distill`
    p = tmp_path / "lora.yaml"
    p.write_text("preset: diffusers-rcm\nstudent:\n  lora:\n    rank: 8\n    alpha: 8\n    target_modules: [to_q]\n")
    assert load_config(p).student.lora == LoraConfig(rank=8, alpha=8.0, target_modules=["to_q"])


def test_lora_export_loads_into_the_teachers_wan_pipeline(tmp_path):
    """`WanPipeline.load_lora_weights(export)` finds the LoRA file among the export's other safetensors and its
    transformer then computes the LoRA student's velocity."""
    from diffusers import WanPipeline

    from tests.teachers.pipeline_tiny import save_wan_pipeline

    root = save_wan_pipeline(tmp_path / "pipeline")
    cfg = _cfg(root / "transformer", tmp_path / "run")
    net, meta = get_task("diffusers").load_teacher(root / "transformer")
    student = with_adapters(net, LoraConfig(**LORA))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(len(name)))
    out = tmp_path / "export"
    out.mkdir()
    get_task("diffusers").write_student(out, student.state_dict(), student_info(cfg, "rf", meta), meta)
    save_file({"noise": torch.zeros(1)}, str(out / "samples.safetensors"))  # a job's export holds this one too
    pipe = WanPipeline.from_pretrained(str(root))
    pipe.load_lora_weights(str(out))
    x, t, cond = wan_inputs(dtype=torch.float32)
    sigma = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    with torch.no_grad():
        tokens = cond["tokens"] * cond["mask"][..., None]
        got = pipe.transformer(
            hidden_states=x, timestep=1000.0 * sigma, encoder_hidden_states=tokens, return_dict=False
        )[0]
        student.match_diffusers_precision = True
        want = student(x, sigma, cond)
        plain = net(x, sigma, cond)  # the teacher alone (its modules carry no adapters)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).norm() / plain.norm() > 1e-2
