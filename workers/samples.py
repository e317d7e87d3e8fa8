"""What a sample request's Ray job runs (`python -m workers.samples`): a preview grid from a job's latest checkpoint.

The API (`POST /v1/jobs/{id}/samples`, service/api/routes/samples.py) has checked the request (bounds, tenant,
a checkpoint exists) and submitted this entry point through the Ray Jobs API with the environment:
RCM_JOB_ID (the training job), RCM_JOB_SPEC (its stored spec), RCM_TEACHER_URI / RCM_TEACHER_FAMILY (what its
worker resolved, from its effective config), RCM_SAMPLE_ID and RCM_SAMPLE_REQUEST (JSON: prompts |
prompt_embeds_uri, steps, num_samples, seed), plus the S3 endpoint and checkpoint bucket.

It downloads the newest complete checkpoint (workers/checkpointing.py), loads the EMA student alone
(rcm_core.preview) and samples with rcm_core's few-step sampler, the code `rcm sample` runs:
- shapes: `num_samples` images per caption -> grid.png + samples.safetensors (uint8 images, captions in metadata);
- diffusers: the prompt-embeddings file (tenant input, as `rcm sample --prompt-embeds`) -> samples.safetensors
  (latents) + grid.png (a latent preview: channels 0-2 of frame 0, not decoded video).
Outputs go to s3://<checkpoint bucket>/jobs/<job id>/samples/<sample id>/, result.json LAST (the API reports the
request succeeded only once it is there). A user-fixable error ends with one `rcm-worker: error:` line naming the
field (prompts[i], prompt_embeds_uri), exit 1; the API shows it as the request's failure reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from botocore.exceptions import BotoCoreError, ClientError

from rcm_core.config import ConfigError
from rcm_core.tasks import get_task
from workers import checkpointing, datasets, storage
from workers.spec import job_config

GRID = "grid.png"
SAMPLES = "samples.safetensors"
RESULT = "result.json"


def samples_prefix(job_id: str, sample_id: str) -> str:
    """Key prefix of a sample request's outputs in the checkpoint bucket (service/api/routes/samples.py: the same)."""
    return f"jobs/{job_id}/samples/{sample_id}/"


def _teacher(job, teacher_uri: str, workdir: Path):
    """The job's frozen teacher network and metadata (the student's architecture), as its workers loaded it."""
    from rcm_core import pipeline

    task = get_task(job.distill.task)
    path = None
    if task.teacher_is_directory:
        path = str(storage.download_prefix(teacher_uri, workdir / "teacher"))
    elif teacher_uri.startswith("s3://"):
        path = str(storage.download(teacher_uri, workdir / "teacher.safetensors"))
    cfg = dataclasses.replace(job.distill, teacher=dataclasses.replace(job.distill.teacher, path=path))
    net, meta, _ = pipeline.get_teacher(cfg)
    return net, meta


def _prompt_embeds(uri: str, dest: Path) -> dict[str, torch.Tensor]:
    from rcm_core import export

    bucket, key = storage.split_uri(uri)
    try:
        storage.s3_client().download_file(bucket, key, str(dest))
    except (ClientError, BotoCoreError) as exc:
        raise ConfigError(f"prompt_embeds_uri {uri}: cannot read it ({storage.s3_reason(exc)})") from None
    try:
        return export.load_prompt_embeds(dest)
    except ConfigError as exc:  # its messages name the local copy: name the URI instead
        raise ConfigError(str(exc).replace("--prompt-embeds", "prompt_embeds_uri").replace(str(dest), uri)) from None


def run(job_id: str, sample_id: str, spec: dict, request: dict, teacher_uri: str, family: str | None) -> dict:
    """Sample the job's newest complete checkpoint per `request`; upload the grid, the samples and result.json.

    Returns:
        result.json's content: step, files (name -> bytes), prompts/steps/num_samples/seed.

    Raises:
        ConfigError: for the user (no checkpoint, a prompt the task cannot take, an unreadable embeddings file).
    """
    from safetensors.torch import save_file

    from rcm_core import preview
    from rcm_core.sampling import student_times

    with tempfile.TemporaryDirectory(prefix=f"rcm-samples-{sample_id[:8]}-") as tmp:
        work = Path(tmp)
        job = datasets.with_dataset_shapes(job_config(spec, output_dir=str(work / "run"), teacher_family=family))
        task = get_task(job.distill.task)
        net, meta = _teacher(job, teacher_uri, work)
        out = work / "out"
        out.mkdir()
        steps, seed = int(request["steps"]), int(request["seed"])
        with checkpointing.restore_latest(job_id) as ckpt:
            if ckpt is None:
                raise ConfigError(f"job {job_id} has no complete checkpoint")
            model = preview.load_ema_student(ckpt, net, meta["parameterization"], job.distill.student.lora)
            step = preview.checkpoint_step(ckpt)
        if task.name == "shapes":
            images, captions = preview.shapes_grid(
                model,
                job.distill,
                list(request["prompts"]),
                num_samples=int(request["num_samples"]),
                steps=steps,
                seed=seed,
                grid=out / GRID,
            )
            save_file({"images": images.contiguous()}, str(out / SAMPLES), metadata={"captions": json.dumps(captions)})
        elif task.teacher_is_directory:
            embeds = _prompt_embeds(request["prompt_embeds_uri"], work / "embeds.safetensors")
            latents = preview.diffusers_latents(
                model,
                embeds,
                times=student_times(steps, job.distill.eval.student_mid_times),
                seed=seed,
                latent_shape=list(job.distill.data.latent_shape) or None,
                grid=out / GRID,
            )
            save_file({"latents": latents.contiguous()}, str(out / SAMPLES))
        else:
            raise ConfigError(f"a {task.name} job takes no prompts: sample previews are for text-conditioned jobs")
        prefix = f"s3://{os.environ['RCM_CHECKPOINT_BUCKET']}/{samples_prefix(job_id, sample_id)}"
        files = {}
        for name in (GRID, SAMPLES):
            storage.upload(out / name, prefix + name)
            files[name] = (out / name).stat().st_size
    result = {"step": step, "files": files, **{k: request.get(k) for k in ("steps", "num_samples", "seed")}}
    storage.put_json(result, samples_prefix(job_id, sample_id) + RESULT)  # last: the request is done
    return result


def main() -> int:
    job_id, sample_id = os.environ["RCM_JOB_ID"], os.environ["RCM_SAMPLE_ID"]
    spec, request = json.loads(os.environ["RCM_JOB_SPEC"]), json.loads(os.environ["RCM_SAMPLE_REQUEST"])
    teacher_uri = os.environ["RCM_TEACHER_URI"]
    family = os.environ.get("RCM_TEACHER_FAMILY") or None
    try:
        result = run(job_id, sample_id, spec, request, teacher_uri, family)
    except (ConfigError, storage.TeacherUnavailable) as exc:
        print(f"rcm-worker: error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"rcm-worker: samples {sample_id} of job {job_id}: step {result['step']}, {result['files']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
