"""`rcm sample --student` (rcm_core/cli.py, issue 18 item 5) on a tiny random Wan2.1 export written by the diffusers
task's write_student: latents equal the few-step sampler run directly with the export's recorded times and seed,
a tiny random AutoencoderKLWan decodes them to PNG frames and a GIF, and bad input exits 2 with one line. The
export read from S3 (s3://.../jobs/ID/export/) and compared with the job's own evaluation:
tests/service/test_e2e_stack.py."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rcm_core import export
from rcm_core.cli import main
from rcm_core.models.flow import FlowModel
from rcm_core.tasks import get_task
from rcm_core.teachers import load_diffusers_net
from tests.teachers.wan_tiny import build_wan_tiny

LATENT = [4, 2, 4, 4]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """An export (transformer/ sharded, sampler record, card, manifest) of a tiny random Wan 'student'."""
    out = tmp_path_factory.mktemp("export")
    model = build_wan_tiny(seed=3)
    meta = {"family": "wan2.1", "config": {"_class_name": "WanTransformer3DModel", **dict(model.config)}}
    info = {
        "task": "diffusers",
        "data": {"dataset": "teacher-synthetic", "latent_shape": LATENT},
        "guidance_scale": 5.0,
        "eval": {"student_mid_times": [1.3, 1.1], "student_steps": [1, 2], "seed": 77},
        "max_shard_size": "30KB",
    }
    get_task("diffusers").write_student(out, dict(model.state_dict()), info, meta)
    (out / export.MANIFEST).write_text(json.dumps(export.export_manifest(out, job_id="local")))
    return out


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0],
    )  # fmt: skip
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(str(path))
    return path


def _embeds(path, *, noise: bool = True, width: int = 24):
    gen = torch.Generator().manual_seed(1)
    tensors = {"tokens": torch.randn(2, 6, width, generator=gen), "mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3])}
    if noise:
        tensors["noise"] = torch.randn(2, *LATENT, generator=gen)
    save_file(tensors, str(path))
    return tensors


def test_sample_student_writes_the_samplers_latents_and_decoded_frames(student_dir, vae_dir, tmp_path):
    record = json.loads((student_dir / export.SAMPLER_CONFIG).read_text())
    assert record["_class_name"] == "FlowMatchLCMScheduler"
    times = record["rcm"]["schedules"]["2"]["trigflow_times"]
    assert times == pytest.approx([torch.pi / 2, 1.3])
    assert record["rcm"]["schedules"]["2"]["sigmas"] == pytest.approx(export.rf_sigmas(times))
    assert (student_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    embeds = _embeds(tmp_path / "embeds.safetensors")
    out = tmp_path / "out"
    args = ["sample", "--student", str(student_dir), "--prompt-embeds", str(tmp_path / "embeds.safetensors")]
    assert main([*args, "--steps", "2", "--vae", str(vae_dir), "--out", str(out)]) == 0
    got = load_file(str(out / "latents.safetensors"))["latents"]
    net, _, _ = load_diffusers_net(student_dir / "transformer", dtype=torch.float32)
    cond = {"tokens": embeds["tokens"] * embeds["mask"][..., None], "mask": embeds["mask"].bool()}
    want = export.sample_student(FlowModel(net, "rf").eval(), cond, embeds["noise"], times, 77)  # eval seed
    assert torch.equal(got, want)
    sampler = json.loads((out / "sampler.json").read_text())
    assert sampler["seed"] == 77 and sampler["trigflow_times"] == times
    frames = sorted((out / "sample-001").glob("frame-*.png"))
    assert len(frames) == 3  # 2 latent frames, temporal factor 2 of this tiny VAE: 1 + 2
    # the pipelines' decode: un-normalise per channel (z * latents_std + latents_mean), VAE, [-1, 1] -> uint8
    from diffusers import AutoencoderKLWan
    from PIL import Image

    vae = AutoencoderKLWan.from_pretrained(str(vae_dir))
    mean, std = torch.tensor([0.1, -0.2, 0.0, 0.3]), torch.tensor([1.5, 0.5, 1.0, 2.0])
    with torch.no_grad():
        video = vae.decode(got * std.view(1, 4, 1, 1, 1) + mean.view(1, 4, 1, 1, 1)).sample
    pixels = ((video[1, :, 2].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(torch.from_numpy(np.array(Image.open(frames[2]))), pixels)
    assert (out / "sample-000.gif").read_bytes().startswith(b"GIF8")


def test_sample_student_draws_noise_from_the_seed_and_recorded_shape(student_dir, tmp_path):
    _embeds(tmp_path / "e.safetensors", noise=False)
    args = ["sample", "--student", str(student_dir / "transformer"), "--prompt-embeds", str(tmp_path / "e.safetensors")]
    assert main([*args, "--steps", "3", "--latent-shape", "4,1,4,4", "--seed", "5", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--steps", "3", "--latent-shape", "4,1,4,4", "--seed", "5", "--out", str(tmp_path / "b")]) == 0
    a = load_file(str(tmp_path / "a" / "latents.safetensors"))["latents"]
    assert a.shape == (2, 4, 1, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, load_file(str(tmp_path / "b" / "latents.safetensors"))["latents"])


def test_sample_student_bad_input_exits_2_with_one_line(student_dir, tmp_path, capsys):
    _embeds(tmp_path / "narrow.safetensors", width=8)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in student_dir.rglob("*"):
        if f.is_file():
            (broken / f.relative_to(student_dir)).parent.mkdir(parents=True, exist_ok=True)
            (broken / f.relative_to(student_dir)).write_bytes(f.read_bytes())
    shard = next((broken / "transformer").glob("*-of-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: the manifest's size no longer holds
    cases = [
        (["--student", str(student_dir), "--prompt-embeds", str(tmp_path / "narrow.safetensors")], "8 wide"),
        (["--student", str(student_dir), "--prompt-embeds", str(tmp_path / "junk.safetensors")], "not a safetensors"),
        (["--student", str(student_dir)], "--prompt-embeds: required"),
        (["--student", str(broken), "--prompt-embeds", str(tmp_path / "narrow.safetensors")], "missing or truncated"),
        (["--student", str(tmp_path / "none"), "--prompt-embeds", "x"], "not a directory"),
    ]
    for argv, says in cases:
        assert main(["sample", *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err


def test_bf16_export_keeps_diffusers_fp32_modules_and_halves_the_size(student_dir, tmp_path):
    from diffusers import WanTransformer3DModel

    model = build_wan_tiny(seed=3)
    meta = {"family": "wan2.1", "config": {"_class_name": "WanTransformer3DModel", **dict(model.config)}}
    info = json.loads((student_dir / "rcm.json").read_text()) | {"dtype": "bfloat16", "max_shard_size": "5GB"}
    get_task("diffusers").write_student(tmp_path, dict(model.state_dict()), info, meta)
    saved = load_file(str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    kept = {k for k in saved if {"time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"} & set(k.split("."))}
    assert kept and all(saved[k].dtype == torch.float32 for k in kept)
    assert all(v.dtype == torch.bfloat16 for k, v in saved.items() if k not in kept)
    fp32_bytes = sum(f.stat().st_size for f in (student_dir / "transformer").glob("*.safetensors"))
    bf16_bytes = (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert bf16_bytes < 0.6 * fp32_bytes
    loaded = WanTransformer3DModel.from_pretrained(str(tmp_path / "transformer"), torch_dtype=torch.bfloat16)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())
