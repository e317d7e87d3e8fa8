"""A distilled diffusers student as a folder a diffusers user can load, and the few-step sampler that runs it.

Layout (written by rcm_core.tasks.diffusers.Diffusers.write_student, uploaded by workers/train_loop.py):

    transformer/                    save_pretrained of the teacher's class (WanTransformer3DModel, ...): config.json,
                                    diffusion_pytorch_model[-0000i-of-0000n].safetensors (+ .index.json if sharded)
    pytorch_lora_weights.safetensors  instead of transformer/ for a LoRA student (student.lora; rcm_core.teachers.lora):
                                    its adapters as diffusers' LoRA loaders read them (load_lora_adapter /
                                    load_lora_weights over the teacher)
    scheduler/scheduler_config.json the rCM sampler record (`sampler_record`), loadable as diffusers'
                                    FlowMatchLCMScheduler with the recorded sigmas
    README.md                       model card: teacher identity (URI, config.json SHA-256), dataset, job id,
                                    metrics, the job spec
    rcm.json                        how it was distilled (task, family, guidance, data, teacher, job)
    report.json, samples.png        the job's final evaluation (teacher vs student) and its latent grid
    samples.safetensors             that evaluation's inputs and outputs: tokens, mask, noise, student_<N>step
    manifest.json                   written LAST (on S3 too): every other file and its size; a reader trusts the
                                    folder only when each listed file is present with that size

The rCM sampler (rcm_core.sampling.sample_consistency) in diffusers terms. The student predicts x0 at TrigFlow time
t: x0 = cos t x_t - sin t F. Its N sampling times are pi/2 followed by N-1 intermediate times (eval.student_mid_times,
default 1.5, 1.4, 1.0); after each x0 prediction it re-noises to the next time with fresh Gaussian noise. With the
SNR-matching map to rectified-flow time, sigma = s = sin t / (sin t + cos t) (rcm_core.trigflow), the same step in RF
coordinates is x0 = x_s - s v, x_{s'} = (1 - s') x0 + s' eps: the step of diffusers' FlowMatchLCMScheduler (and of
any LCM-style flow sampler) run on the recorded `sigmas` with shift 1 and timestep = 1000 sigma, the Wan convention.
No classifier-free guidance at sampling: the student was distilled from the guided teacher.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from rcm_core import trigflow
from rcm_core.config import ConfigError
from rcm_core.sampling import DEFAULT_MID_TIMES, sample_consistency, student_times

EXPORT_FORMAT = "rcm-diffusers-export-v1"
MANIFEST = "manifest.json"
TRANSFORMER_DIR = "transformer"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: a LoRA export's adapters
SAMPLER_CONFIG = "scheduler/scheduler_config.json"
EVAL_SAMPLES = "samples.safetensors"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # diffusers' own default shard size; a 1.3B bf16 student is one shard of 2.8 GB
NUM_TRAIN_TIMESTEPS = 1000  # diffusers' flow schedulers: timestep = 1000 sigma


def rf_sigmas(times: list[float]) -> list[float]:
    """TrigFlow times -> rectified-flow sigmas s = sin t / (sin t + cos t) (SNR matching)."""
    return [float(s) for s in trigflow.rf_time_from_trigflow(torch.tensor(times, dtype=torch.float64))]


def sampler_record(
    *, mid_times: list[float] | tuple[float, ...], step_counts: list[int], latent_shape: list[int], eval_seed: int
) -> dict[str, Any]:
    """scheduler_config.json of an export: diffusers' FlowMatchLCMScheduler (shift 1, no dynamic shifting) plus,
    under "rcm", the few-step sampler's TrigFlow times for each step count the job evaluated, the same times as
    diffusers sigmas and timesteps, the latent shape and the evaluation seed (see the module docstring)."""
    schedules = {}
    for n in sorted(set(step_counts)):
        times = student_times(n, mid_times)
        sigmas = rf_sigmas(times)
        schedules[str(n)] = {
            "trigflow_times": times,
            "sigmas": sigmas,
            "timesteps": [NUM_TRAIN_TIMESTEPS * s for s in sigmas],
        }
    return {
        "_class_name": "FlowMatchLCMScheduler",
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "rcm": {
            "sampler": "multistep consistency: x0 = cos(t) x_t - sin(t) F, re-noise to the next time with fresh noise",
            "mid_times": list(mid_times),
            "default_steps": max(step_counts),
            "schedules": schedules,
            "latent_shape": list(latent_shape),
            "eval_seed": eval_seed,
            "guidance": "none at sampling (distilled from the guided teacher)",
        },
    }


def read_sampler_record(export_dir: Path) -> dict[str, Any] | None:
    """The "rcm" part of an export's scheduler_config.json; None when the folder has none (a bare transformer)."""
    path = export_dir / SAMPLER_CONFIG
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())["rcm"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--student: {SAMPLER_CONFIG} is not an rCM sampler record") from None
    return record


def config_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (the teacher's config.json: its identity together with its URI)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_card(
    *,
    job_id: str,
    family: str,
    class_name: str,
    teacher: dict[str, Any],
    dataset: dict[str, Any],
    metrics: dict[str, float],
    record: dict[str, Any],
    spec: dict[str, Any],
    lora: dict[str, Any] | None = None,
) -> str:
    """README.md of an export: what the student is, where it came from, how well it did, how to load and sample it.
    `lora`: a LoRA student's rank, alpha, targets and dropout (the export then holds the adapters alone)."""
    rcm = record["rcm"]
    if lora is None:
        what = [
            f"A `{class_name}` distilled by rCM (score-regularized continuous-time consistency) from the teacher",
            f"below, for {rcm['default_steps']}-step sampling without classifier-free guidance.",
        ]
        load = [f'transformer = {class_name}.from_pretrained("<this folder>", subfolder="transformer")']
    else:
        what = [
            f"A LoRA of the teacher below (`{teacher.get('uri')}`, a `{class_name}`), distilled by rCM",
            f"(score-regularized continuous-time consistency) for {rcm['default_steps']}-step sampling without",
            f"classifier-free guidance: the teacher's weights plus the adapters in `{LORA_WEIGHTS}` (rank",
            f"{lora['rank']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g}, on",
            f"{', '.join(lora['target_modules'])}). It needs the teacher's weights.",
        ]
        load = [
            f'transformer = {class_name}.from_pretrained("<the teacher\'s transformer folder>")',
            f'transformer.load_lora_adapter("<this folder>", prefix="transformer", weight_name="{LORA_WEIGHTS}")',
            '# or, in a pipeline of the teacher: pipe.load_lora_weights("<this folder>")',
        ]
    lines = [
        "---",
        "library_name: diffusers",
        f"tags: [rcm, consistency-distillation, few-step{', lora' if lora else ''}]",
        "---",
        f"# Few-step rCM {'LoRA' if lora else 'student'} of {family} (job {job_id})",
        "",
        *what,
        "",
        "## Lineage",
        f"- job: `{job_id}`",
        f"- teacher: `{teacher.get('uri')}` (family {family}, config.json SHA-256 `{teacher.get('config_sha256')}`)",
        f"- teacher guidance distilled in: {teacher.get('guidance_scale')}",
        f"- dataset: `{json.dumps(dataset, sort_keys=True)}`",
        "",
        "## Evaluation (the job's final report; EMA weights)",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())],
        "",
        "## Sampler",
        "TrigFlow times per step count (sigmas = sin t / (sin t + cos t); timesteps = 1000 sigma):",
        "",
        *[f"- {n} step(s): t = {s['trigflow_times']}, sigmas = {s['sigmas']}" for n, s in rcm["schedules"].items()],
        "",
        "Each step predicts x0 and re-noises to the next sigma with fresh noise (diffusers' FlowMatchLCMScheduler",
        "with these sigmas and shift 1). With this project: `rcm sample --student <this folder> --prompt-embeds",
        "embeds.safetensors --steps N --out DIR`" + (" --teacher <the teacher's transformer folder>." if lora else "."),
        "",
        "```python",
        f"from diffusers import {class_name}",
        *load,
        "```",
        "",
        "## Job spec",
        "```json",
        json.dumps(spec, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def local_files(root: Path) -> dict[str, int]:
    """Relative POSIX path -> size of every file under `root` except the manifest."""
    return {
        f.relative_to(root).as_posix(): f.stat().st_size
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.relative_to(root).as_posix() != MANIFEST
    }


def export_manifest(root: Path, **fields: Any) -> dict[str, Any]:
    """The manifest of the export in `root` (every file but itself, with sizes) plus `fields`."""
    return {"format": EXPORT_FORMAT, **fields, "files": local_files(root)}


def check_complete(root: Path) -> dict[str, Any]:
    """The export's manifest after checking every listed file is present with its size (ConfigError otherwise)."""
    path = root / MANIFEST
    if not path.is_file():
        raise ConfigError(f"--student: {root} has no {MANIFEST}: not a finished export (or still being written)")
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--student: {root / MANIFEST} is not an export manifest") from None
    bad = [name for name, size in files.items() if not (root / name).is_file() or (root / name).stat().st_size != size]
    if bad:
        raise ConfigError(f"--student: {len(bad)} file(s) the manifest lists are missing or truncated, e.g. {bad[0]}")
    return manifest


def transformer_dir(student: Path) -> Path:
    """The transformer folder of an export root, or `student` itself when it is one."""
    return student / TRANSFORMER_DIR if (student / TRANSFORMER_DIR / "config.json").is_file() else student


def load_prompt_embeds(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors of prompt embeddings: "tokens" (B, L, D) float, optional "mask" (B, L) (nonzero = a real
    token; default: all real) and optional "noise" (B, C, F, H, W), the starting noise. Padding is zeroed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConfigError(f"--prompt-embeds: {path} does not exist")
    try:
        data = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        raise ConfigError(f"--prompt-embeds: {path} is not a safetensors file") from None
    tokens = data.get("tokens")
    if tokens is None or tokens.dim() != 3 or not tokens.is_floating_point():
        raise ConfigError('--prompt-embeds: needs "tokens", a float tensor (B, L, D)')
    mask = data.get("mask")
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ConfigError(f'--prompt-embeds: "mask" is {tuple(mask.shape)}, "tokens" needs {tuple(tokens.shape[:2])}')
    mask = mask != 0
    out = {"tokens": tokens.float() * mask[..., None], "mask": mask}
    noise = data.get("noise")
    if noise is not None:
        if noise.dim() != 5 or noise.shape[0] != tokens.shape[0]:
            raise ConfigError(f'--prompt-embeds: "noise" must be (B={tokens.shape[0]}, C, F, H, W)')
        out["noise"] = noise.float()
    return out


@torch.no_grad()
def sample_student(model, cond: dict[str, torch.Tensor], noise: torch.Tensor, times: list[float], seed: int):
    """The few-step sampler exactly as the job's evaluation runs it (rcm_core.tasks.diffusers.Diffusers.evaluate):
    `model` a FlowModel (x_t, t, cond) -> F, re-noising drawn from a generator seeded with `seed`."""
    gen = torch.Generator(device=noise.device).manual_seed(seed)
    return sample_consistency(lambda x, t: model(x, t, cond), noise, times, generator=gen)


def s3_filesystem():
    """A pyarrow S3 filesystem from the environment: RCM_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL), AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, RCM_S3_REGION (default us-east-1). NOTE: pyarrow itself ignores AWS_ENDPOINT_URL."""
    import os

    import pyarrow.fs

    endpoint = os.environ.get("RCM_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"region": os.environ.get("RCM_S3_REGION", "us-east-1")}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs |= {"endpoint_override": host, "scheme": scheme}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs |= {"access_key": os.environ["AWS_ACCESS_KEY_ID"], "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"]}
    return pyarrow.fs.S3FileSystem(**kwargs)


def download_export(uri: str, dest: Path, fs=None) -> Path:
    """Copy the export at s3://bucket/prefix/ into `dest`, after reading its manifest (no manifest: not finished,
    refused); only the files the manifest lists are read. Returns `dest`, checked complete."""
    import pyarrow.fs

    fs = fs or s3_filesystem()
    root = uri.removeprefix("s3://").rstrip("/")
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
            raw = f.read(1 << 24)
        files = dict(json.loads(raw)["files"])
    except FileNotFoundError:
        raise ConfigError(
            f"--student: {uri} has no {MANIFEST}: not a finished export (or still being written)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"--student: cannot read {uri} ({type(exc).__name__})") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--student: {uri}{MANIFEST} is not an export manifest") from None
    dest.mkdir(parents=True, exist_ok=True)
    local = pyarrow.fs.LocalFileSystem()
    for name in files:
        if name.startswith("/") or ".." in Path(name).parts:
            raise ConfigError(f"--student: the manifest names a file outside the export: {name[:80]!r}")
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(f"{root}/{name}", str(dest / name), source_filesystem=fs, destination_filesystem=local)
    (dest / MANIFEST).write_bytes(raw)
    check_complete(dest)
    return dest


__all__ = [
    "DEFAULT_MID_TIMES",
    "EVAL_SAMPLES",
    "EXPORT_FORMAT",
    "MANIFEST",
    "SAMPLER_CONFIG",
    "check_complete",
    "config_sha256",
    "download_export",
    "export_manifest",
    "load_prompt_embeds",
    "model_card",
    "read_sampler_record",
    "rf_sigmas",
    "sample_student",
    "sampler_record",
    "transformer_dir",
]
