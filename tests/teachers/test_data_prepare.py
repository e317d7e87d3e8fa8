"""`rcm data prepare` on tiny random Wan2.1 / Cosmos-Predict2 pipeline directories (real transformers encoders,
real diffusers VAE and transformers, built in the test): the shards read back through rcm_core.data.latent_shards
equal what the diffusers pipelines' own prompt encoding, VAE normalisation and the teacher's sampler give; bad
input exits 2 with one line naming the problem; the output goes to a local directory or real S3 (SeaweedFS).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from rcm_core.cli import main
from rcm_core.config import ConfigError
from rcm_core.data.latent_shards import iter_shard, read_manifest
from tests.teachers.pipeline_tiny import IMAGE_SIZE, save_cosmos_pipeline, save_wan_pipeline

ROOT = Path(__file__).parents[2]
# HTML entities and runs of whitespace (Wan's prompt_clean), a prompt past max_sequence_length (truncation),
# letters outside the word list (character pieces), a non-ASCII letter (the unknown token)
PROMPTS = [
    "a cat on the mat",
    "blue sky &amp;   the dog  runs",
    "the big red dog runs under the sky " * 3,
    "zebra caf\u00e9 sees a small cat",
    "dog",
]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory) -> Path:
    return save_wan_pipeline(tmp_path_factory.mktemp("wan") / "pipeline")


@pytest.fixture(scope="module")
def cosmos_dir(tmp_path_factory) -> Path:
    return save_cosmos_pipeline(tmp_path_factory.mktemp("cosmos") / "pipeline")


def _prompt_file(tmp_path: Path, prompts=PROMPTS) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return path


def _read(root: Path) -> tuple:
    fs = pafs.LocalFileSystem()
    manifest = read_manifest(fs, str(root))
    rows = [r for s in manifest.shards for r in iter_shard(fs, str(root), manifest, s["name"])]
    return manifest, rows


def _prepare(*args) -> int:
    return main(["data", "prepare", *map(str, args), "--device", "cpu"])


def test_prepare_wan_prompts_match_wan_pipeline_encode_prompt(wan_dir, tmp_path):
    from diffusers import WanPipeline

    out = tmp_path / "ds"
    # default max_sequence_length (512, as WanPipeline.__call__), 2 shards
    assert _prepare(_prompt_file(tmp_path), "--pipeline", wan_dir, "--out", out, "--batch-size", 2,
                    "--samples-per-shard", 3) == 0  # fmt: skip
    manifest, rows = _read(out)
    assert manifest.count == len(PROMPTS) and [s["count"] for s in manifest.shards] == [3, 2]
    assert manifest.latent is None and manifest.text == {"tokens": 512, "dim": 24, "dtype": "float32"}
    enc = manifest.encoder
    assert (enc["class"], enc["pipeline"], enc["family"], enc["max_sequence_length"]) == (
        "UMT5EncoderModel", "WanPipeline", "wan2.1", 512)  # fmt: skip
    config = (wan_dir / "text_encoder" / "config.json").read_bytes()
    import hashlib

    assert enc["config_sha256"] == hashlib.sha256(b"config.json\0" + config + b"\0").hexdigest()
    assert manifest.vae["class"] == "AutoencoderKLWan"

    pipe = WanPipeline.from_pretrained(str(wan_dir))
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512, device="cpu")
    assert [r["caption"] for r in rows] == PROMPTS
    tokens = torch.stack([r["tokens"] for r in rows])
    assert torch.equal(tokens, ref)
    lengths = torch.stack([r["mask"] for r in rows]).sum(1)
    ids = pipe.tokenizer([pipe_clean(p) for p in PROMPTS], max_length=512, truncation=True).input_ids
    assert lengths.tolist() == [len(i) for i in ids]
    assert ref[0, lengths[0] :].abs().sum() == 0 and ref[0, : lengths[0]].abs().sum() > 0


def pipe_clean(prompt: str) -> str:
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(prompt)


def test_prepare_cosmos_prompts_match_cosmos2_get_t5_prompt_embeds(cosmos_dir, tmp_path):
    from diffusers.pipelines.cosmos.pipeline_cosmos2_text2image import Cosmos2TextToImagePipeline
    from transformers import AutoTokenizer, T5EncoderModel

    out = tmp_path / "ds"
    assert _prepare(_prompt_file(tmp_path), "--pipeline", cosmos_dir, "--out", out, "--max-sequence-length", 12) == 0
    manifest, rows = _read(out)
    assert manifest.text == {"tokens": 12, "dim": 8, "dtype": "float32"}
    assert (manifest.encoder["class"], manifest.encoder["family"]) == ("T5EncoderModel", "cosmos-predict2")
    # Cosmos2's pipeline object needs its guardrail package: run its own method on the same components
    ns = types.SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(str(cosmos_dir / "tokenizer")),
        text_encoder=T5EncoderModel.from_pretrained(str(cosmos_dir / "text_encoder")).eval(),
    )
    with torch.no_grad():
        ref = partial(Cosmos2TextToImagePipeline._get_t5_prompt_embeds, ns)(
            prompt=PROMPTS, max_sequence_length=12, device=torch.device("cpu")
        )
    assert torch.equal(torch.stack([r["tokens"] for r in rows]), ref)
    assert rows[2]["mask"].all() and not rows[4]["mask"].all()  # the long prompt is truncated to 12


def _pixels(seed: int, size=IMAGE_SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_prepare_images_latents_are_the_normalised_vae_mode(wan_dir, tmp_path):
    from diffusers import AutoencoderKLWan
    from PIL import Image

    media = tmp_path / "media"
    media.mkdir()
    names = []
    for i in range(3):
        Image.fromarray(_pixels(i)).save(media / f"img{i}.png")
        names.append(f"media/img{i}.png")
    (tmp_path / "media.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "ds"
    prompts = _prompt_file(tmp_path, PROMPTS[:3])
    assert _prepare(prompts, "--pipeline", wan_dir, "--out", out, "--media", tmp_path / "media.txt",
                    "--size", "32x64", "--batch-size", 2, "--max-sequence-length", 8) == 0  # fmt: skip
    manifest, rows = _read(out)
    assert manifest.latent == {"shape": [4, 1, 4, 8], "dtype": "float32"}
    assert manifest.extra["latents"] == "vae" and manifest.vae["sigma_data"] == 1.0

    vae = AutoencoderKLWan.from_pretrained(str(wan_dir / "vae")).eval()
    pixels = torch.stack([torch.from_numpy(_pixels(i)).float() for i in range(3)]).permute(0, 3, 1, 2)[:, :, None]
    with torch.no_grad():
        mode = vae.encode(pixels / 127.5 - 1).latent_dist.mode()  # (3, 4, 1, 4, 8)
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    latents = torch.stack([r["latent"] for r in rows])
    torch.testing.assert_close(latents, (mode - mean) / std, rtol=1e-5, atol=1e-5)
    # WanPipeline's own inverse before vae.decode (latents / (1 / std) + mean) gives the VAE's mode back
    torch.testing.assert_close(latents / (1.0 / std) + mean, mode, rtol=1e-5, atol=1e-5)


def test_prepare_frame_folders_encode_video_latents(wan_dir, tmp_path):
    from diffusers import AutoencoderKLWan
    from PIL import Image

    lines = []
    for clip in range(2):
        folder = tmp_path / f"clip{clip}"
        folder.mkdir()
        for f in range(5):  # 1 + 1 * temporal factor 4 -> 2 latent frames
            Image.fromarray(_pixels(10 * clip + f, (48, 80))).save(folder / f"{f:03d}.png")  # resized + cropped
        lines.append(folder.name)
    (tmp_path / "media.txt").write_text("\n".join(lines))
    out = tmp_path / "ds"
    assert _prepare(_prompt_file(tmp_path, PROMPTS[:2]), "--pipeline", wan_dir, "--out", out, "--media",
                    tmp_path / "media.txt", "--size", "32x64", "--max-sequence-length", 8) == 0  # fmt: skip
    manifest, rows = _read(out)
    assert manifest.latent["shape"] == [4, 2, 4, 8]
    from rcm_core.data.prepare import load_pixels

    vae = AutoencoderKLWan.from_pretrained(str(wan_dir / "vae")).eval()
    video = load_pixels(tmp_path / "clip1", IMAGE_SIZE, "test")
    assert video.shape == (3, 5, *IMAGE_SIZE) and video.min() >= -1 and video.max() <= 1
    with torch.no_grad():
        mode = vae.encode(video[None]).latent_dist.mode()[0]
    mean = torch.tensor(vae.config.latents_mean).view(4, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(4, 1, 1, 1)
    torch.testing.assert_close(rows[1]["latent"], (mode - mean) / std, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["wan", "cosmos"])
def test_prepare_synthesize_latents_equal_teacher_sampler(family, wan_dir, cosmos_dir, tmp_path):
    from rcm_core.models.flow import guided_f
    from rcm_core.sampling import sample_euler
    from rcm_core.teachers import load_diffusers_teacher
    from rcm_core.teachers.pipeline_parts import TextEncoder

    pipeline = wan_dir if family == "wan" else cosmos_dir
    shape = (4, 3, 4, 8) if family == "wan" else (4, 1, 4, 8)
    out, length, steps, seed = tmp_path / "ds", 8, 3, 11
    args = [_prompt_file(tmp_path, PROMPTS[:3]), "--pipeline", pipeline, "--out", out, "--synthesize"]
    args += ["--latent-shape", ",".join(map(str, shape)), "--steps", steps, "--seed", seed, "--batch-size", 2]
    assert _prepare(*args, "--max-sequence-length", length) == 0
    manifest, rows = _read(out)
    synth = manifest.extra["synthesis"]
    expected_w = 5.0 if family == "wan" else 8.0  # Wan's 5 as is; Cosmos's 7 in the project's form, 1 + 7
    assert (synth["steps"], synth["seed"], synth["guidance_project"]) == (steps, seed, expected_w)
    assert manifest.latent["shape"] == list(shape)

    # the reference: the encoder applied directly, the negative prompt of the pipeline, one sample at a time
    text = TextEncoder(pipeline, max_sequence_length=length)
    teacher = load_diffusers_teacher(pipeline / "transformer", dtype=torch.float32).eval()
    neg, neg_len = text.encode([text.kind.negative_prompt])
    null = {"tokens": neg, "mask": torch.arange(length)[None] < neg_len[:, None]}
    assert (synth["negative_prompt"] == "") == (family == "wan")
    for i, row in enumerate(rows):
        tokens, lengths = text.encode([PROMPTS[i]])
        torch.testing.assert_close(row["tokens"][None], tokens, rtol=0, atol=0)
        cond = {"tokens": tokens, "mask": torch.arange(length)[None] < lengths[:, None]}
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))[None]
        with torch.no_grad():
            ref = sample_euler(lambda x, t: guided_f(teacher, x, t, cond, null, expected_w), noise, steps)  # noqa: B023
        # batch of 2 in the dataset vs 1 here: the same math, float32 summation order may differ
        torch.testing.assert_close(row["latent"], ref[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(rows[0]["latent"], rows[1]["latent"])


def test_prepare_writes_shards_to_s3(wan_dir, tmp_path, monkeypatch):
    from tests.service.realstack import running_s3

    with running_s3(tmp_path / "s3") as (url, creds, client):
        monkeypatch.setenv("RCM_S3_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["S3_ACCESS_KEY"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["S3_SECRET_KEY"])
        prompts = _prompt_file(tmp_path, PROMPTS[:3])
        uri = "s3://ckpt/tenants/t1/inputs/datasets/x"
        assert _prepare(prompts, "--pipeline", wan_dir, "--out", uri, "--max-sequence-length", 8) == 0
        from rcm_core.data.prepare import open_output

        fs = pafs.S3FileSystem(endpoint_override=url.split("://")[1], scheme="http", region="us-east-1",
                               access_key=creds["S3_ACCESS_KEY"], secret_key=creds["S3_SECRET_KEY"])  # fmt: skip
        manifest = read_manifest(fs, "ckpt/tenants/t1/inputs/datasets/x")
        rows = list(iter_shard(fs, "ckpt/tenants/t1/inputs/datasets/x", manifest, manifest.shards[0]["name"]))
        assert [r["caption"] for r in rows] == PROMPTS[:3]
        before = client.get_object(Bucket="ckpt", Key="tenants/t1/inputs/datasets/x/manifest.json")["Body"].read()
        # a second run into the same prefix is refused and leaves the dataset as it was
        with pytest.raises(ConfigError, match="already holds a dataset"):
            open_output(uri)
        after = client.get_object(Bucket="ckpt", Key="tenants/t1/inputs/datasets/x/manifest.json")["Body"].read()
        assert before == after and json.loads(after)["count"] == 3


def _bad_input_cases(tmp_path: Path, wan_dir: Path) -> dict[str, tuple[list, str]]:
    from PIL import Image

    p = tmp_path
    Image.fromarray(_pixels(0)).save(p / "good.png")
    (p / "good.txt").write_text("good.png\ngood.png\n")
    (p / "bad_utf8.txt").write_bytes(b"a cat\nthe \xff dog\n")
    (p / "blank.txt").write_text("a cat\ndog\n\nsky\n")
    (p / "ctrl.txt").write_text("a cat\nthe\x00dog\n")
    (p / "empty.txt").write_text("")
    (p / "ok.txt").write_text("a cat\ndog\n")
    (p / "one.txt").write_text("a.png\n")
    (p / "video.txt").write_text("good.png\nclip.mp4\n")
    (p / "a.png").write_bytes(b"not really a png")
    (p / "clip.mp4").write_bytes(b"\0")
    (p / "two.txt").write_text("a.png\na.png\n")
    (p / "existing").mkdir()
    (p / "existing" / "manifest.json").write_text('{"keep": true}')
    (p / "notpipe").mkdir()
    (p / "notpipe" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    ok, pipe = str(p / "ok.txt"), ["--pipeline", str(wan_dir)]
    out = ["--out", str(p / "new")]
    return {
        "not utf-8": ([str(p / "bad_utf8.txt"), *pipe, *out], "line 2: not UTF-8"),
        "blank line": ([str(p / "blank.txt"), *pipe, *out], "line 3: empty prompt"),
        "control char": ([str(p / "ctrl.txt"), *pipe, *out], "line 2: control character U+0000"),
        "no prompts": ([str(p / "empty.txt"), *pipe, *out], "no prompts"),
        "missing file": ([str(p / "nope.txt"), *pipe, *out], "nope.txt: no such file"),
        "media count": ([ok, *pipe, *out, "--media", str(p / "one.txt"), "--size", "32x64"], "has 1 lines"),
        "video file": ([ok, *pipe, *out, "--media", str(p / "video.txt"), "--size", "32x64"], "line 2: video files"),
        "bad image": ([ok, *pipe, *out, "--media", str(p / "two.txt"), "--size", "32x64"], "a.png is not a readable"),
        "size": ([ok, *pipe, *out, "--media", str(p / "good.txt"), "--size", "36x64"], "divisible by the VAE"),
        "no shape": ([ok, *pipe, *out, "--synthesize"], "--latent-shape: required"),
        "channels": ([ok, *pipe, *out, "--synthesize", "--latent-shape", "3,1,4,8"], "in_channels=4"),
        "existing": ([ok, *pipe, "--out", str(p / "existing")], "already holds a dataset"),
        "pipeline": ([ok, "--pipeline", str(p / "notpipe"), *out], "'StableDiffusionPipeline' in model_index"),
        "no pipeline": ([ok, "--pipeline", str(p), *out], "not a diffusers pipeline directory"),
    }


def test_prepare_bad_input_exits_2_with_one_line(wan_dir, tmp_path, capsys):
    cases = _bad_input_cases(tmp_path, wan_dir)
    for name, (args, expected) in cases.items():
        assert main(["data", "prepare", *args, "--device", "cpu"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, (name, err)
    assert (tmp_path / "existing" / "manifest.json").read_text() == '{"keep": true}'
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def test_rcm_command_data_prepare_bad_line_exits_2(tmp_path):
    # through the installed entry point's module (rcm_client execs rcm_core's CLI): one line on stderr, exit 2
    (tmp_path / "p.txt").write_bytes(b"ok\n\xc3\n")
    cmd = [sys.executable, "-m", "rcm_client.cli", "data", "prepare", str(tmp_path / "p.txt"),
           "--pipeline", str(tmp_path), "--out", str(tmp_path / "o")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"rcm: error: prompts: {tmp_path / 'p.txt'}: line 2: not UTF-8 (byte 1)"
    ]


def test_prepare_synthesize_refuses_encoder_width_unlike_teacher(wan_dir, tmp_path, capsys):
    import shutil

    from tests.teachers.pipeline_tiny import tiny_text_encoder, tiny_tokenizer

    pipeline = tmp_path / "pipeline"
    shutil.copytree(wan_dir, pipeline)
    shutil.rmtree(pipeline / "text_encoder")
    tiny_text_encoder("UMT5EncoderModel", 16, len(tiny_tokenizer())).save_pretrained(str(pipeline / "text_encoder"))
    args = [_prompt_file(tmp_path), "--pipeline", pipeline, "--out", tmp_path / "ds", "--synthesize"]
    assert _prepare(*args, "--latent-shape", "4,1,4,8", "--max-sequence-length", 8) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rcm: error: --pipeline: the text encoder gives 16-wide tokens, the transformer takes 24"
