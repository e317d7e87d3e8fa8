"""What a Ray job runs (`python -m workers.entrypoint`): check the inputs, resolve the teacher (a diffusers teacher:
its family, from its config.json), run the trainer.

Errors a user can fix (unreadable or malformed teacher or prompt file, invalid spec) end the job with one
readable line on stderr and exit status 1, before any Ray Train worker starts (a failure inside the workers
would be retried FailureConfig.max_failures times first); Ray puts the tail of the log into the job's failure
message. So does a run the workers stopped as non-finite (their reason is read back from S3).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from rcm_core.config import ConfigError
from rcm_core.parallel.parallelize import check_parallelizable
from rcm_core.tasks import get_task
from workers import datasets, storage
from workers.spec import JobConfig, effective_spec, job_config

ABSOLUTE_PATH = re.compile(r"(?<![\w:/])/[^\s'\",:)]+")  # /tmp/rcm-..., /home/...: not s3:// or http:// URLs


def check_inputs(spec: dict) -> JobConfig:
    """Convert the spec to rcm_core's configs and read and parse its prompt file, as the workers will.

    Raises:
        ConfigError, storage.PromptFileUnavailable: with a message for the user.
    """
    with tempfile.TemporaryDirectory() as tmp:
        job = datasets.with_dataset_shapes(job_config(spec, output_dir=str(Path(tmp) / "run")))
        if job.prompt_file_uri:
            uri = job.prompt_file_uri
            check_prompt_file(storage.fetch_prompt_file(uri, Path(tmp) / "prompts.txt"), uri)
    return job


def check_prompt_file(path: Path, uri: str) -> None:
    """Every caption of the prompt file parses (rcm_core.data.shapes grammar), as the workers will load it.

    NOTE: the message names the URI and the line number, never the line's text or the local copy's path: a
    failure reason is shown through the API and must not echo file contents.

    Raises:
        ConfigError: naming `uri` and the first bad line.
    """
    from rcm_core.data.shapes import parse_caption

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"data.prompt_file_uri {uri}: not UTF-8 text") from None
    captions = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            parse_caption(line)
        except ValueError:
            raise ConfigError(
                f"data.prompt_file_uri {uri}, line {number}: not a caption of the shapes grammar (README: prompt files)"
            ) from None
        captions += 1
    if not captions:
        raise ConfigError(f"data.prompt_file_uri {uri}: no captions (one per line expected)")


def resolve_family(job: JobConfig) -> str | None:
    """A diffusers teacher's family, read from its config.json in S3 and checked as the workers will load it
    (teacher.family agrees, a supported variant, data.latent_shape and cp_degree fit it); None for other tasks.

    Raises:
        ConfigError, storage.TeacherUnavailable: with a message for the user (never the file's content).
    """
    task, uri = get_task(job.distill.task), job.teacher_uri
    if not task.teacher_is_directory:
        return None
    if not (uri.startswith("s3://") and uri.endswith("/")):
        raise ConfigError(f"teacher.uri {uri}: a {task.name} teacher is a folder, s3://bucket/prefix/ (ending in /)")
    from rcm_core.tasks.diffusers import check_teacher_config

    try:
        config = json.loads(storage.read_teacher_config(uri))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"teacher.uri {uri}: config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise ConfigError(f"teacher.uri {uri}: config.json is not a JSON object")
    family = check_teacher_config(config, job.distill, job.parallel.cp_degree).name
    storage.check_teacher_weights(uri)
    return family


def resolve_teacher(job: JobConfig) -> tuple[str, str]:
    """The teacher's URI after checking that it can be read and fits the task, and where it came from.

    A built-in teacher that ships with rcm_core stays `builtin:<task>` (every worker image has it). One that is
    trained (the 2-D teacher) is trained once per config and shared by every job: it is cached in S3 under
    teachers/builtin/<content key>.safetensors, the key a hash of everything that shapes its weights.

    Returns:
        (URI the workers load, source: "shipped" | "cached" | "trained" | "uri")
    """
    cfg, uri = job.distill, job.teacher_uri
    task = get_task(cfg.task)
    if task.teacher_is_directory:  # a diffusers folder: resolve_family has read and checked its config.json
        return uri, "uri"
    if uri.startswith("builtin:"):
        if uri != f"builtin:{task.name}":
            raise ConfigError(f"teacher.uri {uri}: not the built-in teacher of task {task.name!r}")
        key = task.teacher_cache_key(cfg)
        if key is None:
            net, _ = task.builtin_teacher(cfg)  # loads the shipped file: fails here, not in every worker
            try:
                check_parallelizable(net, job.parallel, job.parallel.cp_degree)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            return uri, "shipped"
        uri = f"s3://{os.environ['RCM_CHECKPOINT_BUCKET']}/teachers/builtin/{key}.safetensors"
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "teacher.safetensors"
            try:
                storage.download(uri, local)
                source = "cached"
            except storage.TeacherUnavailable:
                from rcm_core.teacher import save_teacher

                net, meta = task.builtin_teacher(cfg)
                save_teacher(net, local, meta)
                storage.upload(local, uri)
                source = "trained"
            _check_teacher(local, job, uri)
        return uri, source
    if not uri.startswith("s3://"):
        raise ConfigError(f"teacher.uri: unsupported {uri!r}")
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download(uri, Path(tmp) / "teacher.safetensors")
        _check_teacher(local, job, uri)
    return uri, "uri"


def _check_teacher(path: Path, job: JobConfig, uri: str) -> None:
    """Load the teacher file as the workers will; its task must be the job's."""
    from rcm_core.teacher import read_teacher_meta

    task = get_task(job.distill.task)
    try:
        found = read_teacher_meta(path).get("task", "toy2d")
        if found != task.name:
            raise ConfigError(
                f"teacher.uri {uri}: a {found!r} teacher cannot be distilled on data.dataset "
                f"{job.distill.data.dataset!r}"
            )
        net, _ = task.load_teacher(path)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001  (any parse error means the file is not a teacher)
        raise ConfigError(f"teacher.uri {uri}: not a valid teacher file ({type(exc).__name__})") from None
    try:  # context parallelism and checkpointing need DiT blocks, Ulysses whole heads per rank
        check_parallelizable(net, job.parallel, job.parallel.cp_degree)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def public_error(error: BaseException) -> str:
    """One line about `error` fit for the job's failure reason: the last line of its message (the innermost
    exception, after Ray's tracebacks), absolute paths replaced, at most 500 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    return ABSOLUTE_PATH.sub("<path>", text)[:500]


def main() -> int:
    job_id = os.environ["RCM_JOB_ID"]
    spec = json.loads(os.environ["RCM_JOB_SPEC"])
    try:
        job = check_inputs(spec)
        family = resolve_family(job)
        if family is not None:  # the preset's defaults depend on it (e.g. the guidance scale)
            job = job_config(spec, output_dir=job.distill.train.output_dir, teacher_family=family)
            job = datasets.with_dataset_shapes(job)
        teacher_uri, source = resolve_teacher(job)
    except (ConfigError, storage.TeacherUnavailable, storage.PromptFileUnavailable) as exc:
        print(f"rcm-worker: error: {exc}", file=sys.stderr, flush=True)
        return 1
    # what the job runs with, for the API (a trained built-in teacher shows as its cached S3 object)
    effective = effective_spec(dataclasses.replace(job, teacher_uri=teacher_uri))
    storage.put_json(effective, f"jobs/{job_id}/effective_config.json")
    from workers.launch import build_trainer

    print(
        f"rcm-worker: job {job_id}: teacher {teacher_uri} ({source}); starting {job.num_workers} worker(s)", flush=True
    )
    result = build_trainer(job_id, job, spec, teacher_uri, source, teacher_family=family).fit()
    if result.error is not None:
        print(f"rcm-worker: training error (full): {result.error}", flush=True)  # the cluster's log, for operators
        print(f"rcm-worker: error: training failed: {public_error(result.error)}", file=sys.stderr, flush=True)
        return 1
    reason = storage.failure_reason(job_id)
    if reason is not None:
        print(f"rcm-worker: error: {reason}", file=sys.stderr, flush=True)
        return 1
    print(f"rcm-worker: job {job_id} finished at {result.metrics}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
