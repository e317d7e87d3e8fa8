"""workers/samples.py (what `POST /v1/jobs/{id}/samples` runs on the cluster) for a diffusers job, against real S3
(SeaweedFS): a tiny Wan job's checkpoint in the Ray run layout (shards + manifest listing them), the teacher folder
and a prompt-embeddings file in the tenant's inputs -> the latents of the checkpoint's EMA student, with the job
evaluation's sampler, stored under jobs/<id>/samples/<sid>/ with result.json last; errors name the field.
The shapes path runs through the whole service in tests/service/test_e2e_stack.py."""

import json

import boto3
import pytest
import torch
from safetensors.torch import load, save_file

from rcm_core import pipeline
from rcm_core.config import ConfigError
from rcm_core.export import sample_student
from rcm_core.sampling import student_times
from tests.teachers.test_diffusers_task import _cfg
from tests.teachers.wan_tiny import save_wan_tiny

JOB = "0b9d8c2e-0000-4000-8000-000000000001"
TEACHER = "s3://ckpt/tenants/t/wan/"
SPEC = {
    "name": "w",
    "teacher": {"uri": TEACHER},
    "data": {"dataset": "teacher-synthetic", "latent_shape": [4, 2, 4, 4], "text_tokens": 6, "num_prompts": 3},
    "eval": {"student_mid_times": [1.3, 0.9, 0.6]},
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """SeaweedFS holding the teacher folder, a 2-step job's checkpoint (Ray layout, manifest last) and embeddings."""
    from tests.service.realstack import running_s3
    from workers.checkpointing import checkpoint_dir_name, local_files, publish_manifest

    tmp = tmp_path_factory.mktemp("samples")
    teacher = save_wan_tiny(tmp / "transformer")
    distiller = pipeline.distill(_cfg(teacher, tmp / "run", [4, 2, 4, 4], "wan2.1"))
    ckpt = tmp / "run" / "checkpoints" / "step-2"
    gen = torch.Generator().manual_seed(1)
    embeds = {"tokens": torch.randn(2, 6, 24, generator=gen), "mask": torch.tensor([[1] * 4 + [0] * 2, [1] * 6])}
    save_file(embeds, str(tmp / "embeds.safetensors"))
    save_file({"tokens": torch.randn(1, 6, 16)}, str(tmp / "narrow.safetensors"))
    with running_s3(tmp / "s3") as (url, creds, s3):
        for f in teacher.iterdir():
            s3.upload_file(str(f), "ckpt", f"tenants/t/wan/{f.name}")
        for name in ("embeds", "narrow"):
            s3.upload_file(str(tmp / f"{name}.safetensors"), "ckpt", f"tenants/t/{name}.safetensors")
        prefix = f"ray/{JOB}/{checkpoint_dir_name(2, 0)}/"
        files = {n: s for n, s in local_files(ckpt).items() if n != "manifest.json"}
        for name in files:
            s3.upload_file(str(ckpt / name), "ckpt", prefix + name)
        publish_manifest(s3, "ckpt", prefix, json.loads((ckpt / "manifest.json").read_text()), files)
        env = {"RCM_S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": creds["S3_ACCESS_KEY"], "RCM_CHECKPOINT_BUCKET": "ckpt"}
        env["AWS_SECRET_ACCESS_KEY"] = creds["S3_SECRET_KEY"]
        yield {"s3": s3, "env": env, "distiller": distiller, "embeds": embeds}


def _run(stored, monkeypatch, request, job=JOB, sid="s1"):
    from workers import samples

    for k, v in stored["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # boto3 caches the first credentials a process resolves
    return samples.run(job, sid, SPEC, request, TEACHER, "wan2.1")


def test_diffusers_samples_are_the_checkpoints_ema_student_latents(stored, monkeypatch):
    request = {"prompt_embeds_uri": "s3://ckpt/tenants/t/embeds.safetensors", "steps": 2, "num_samples": 1, "seed": 9}
    result = _run(stored, monkeypatch, request)
    assert result["step"] == 2 and set(result["files"]) == {"grid.png", "samples.safetensors"}
    prefix = f"jobs/{JOB}/samples/s1/"
    body = lambda name: stored["s3"].get_object(Bucket="ckpt", Key=prefix + name)["Body"].read()  # noqa: E731
    assert json.loads(body("result.json")) == result
    assert body("grid.png").startswith(b"\x89PNG")
    latents = load(body("samples.safetensors"))["latents"]
    # the job's own EMA student, sampled here with the evaluation's sampler, the spec's times and the seed
    embeds = stored["embeds"]
    cond = {"tokens": embeds["tokens"] * embeds["mask"][..., None], "mask": embeds["mask"] != 0}
    noise = torch.randn((2, 4, 2, 4, 4), generator=torch.Generator().manual_seed(9))
    want = sample_student(stored["distiller"].ema.model.eval(), cond, noise, student_times(2, [1.3, 0.9, 0.6]), 9)
    assert latents.shape == (2, 4, 2, 4, 4)
    torch.testing.assert_close(latents, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("request_", "job", "expected"),
    [
        ({"prompt_embeds_uri": "s3://ckpt/tenants/t/narrow.safetensors"}, JOB, "prompt embeddings do not fit"),
        ({"prompt_embeds_uri": "s3://ckpt/tenants/t/none.safetensors"}, JOB, "prompt_embeds_uri s3://ckpt/tenants/t"),
        ({"prompt_embeds_uri": "s3://ckpt/tenants/t/embeds.safetensors"}, "no-such-job", "no complete checkpoint"),
    ],
)
def test_sample_worker_errors_name_the_field(stored, monkeypatch, request_, job, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        _run(stored, monkeypatch, {"steps": 1, "num_samples": 1, "seed": 0, **request_}, job=job, sid="bad")
    assert "/tmp" not in str(info.value)  # names the URI, never the worker's local copy
