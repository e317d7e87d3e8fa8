"""What a Ray job runs (`python -m workers.entrypoint`): check the inputs, resolve the teacher, run the trainer.

Errors a user can fix (unreadable or malformed teacher or prompt file, invalid spec) end the job with one
readable line on stderr and exit status 1, before any Ray Train worker starts (a failure inside the workers
would be retried FailureConfig.max_failures times first); Ray puts the tail of the log into the job's failure
message.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

from rcm_core.config import ConfigError
from workers import storage

BUILTIN_SHAPES = "builtin:shapes"
ABSOLUTE_PATH = re.compile(r"(?<![\w:/])/[^\s'\",:)]+")  # /tmp/rcm-..., /home/...: not s3:// or http:// URLs


def check_inputs(spec: dict) -> None:
    """Read and parse the prompt file, and convert the spec to rcm_core's configs, as the workers will.

    Raises:
        ConfigError, storage.PromptFileUnavailable: with a message for the user.
    """
    from workers.spec import distill_config_from_spec, parallel_config_from_spec

    uri = spec["data"].get("prompt_file_uri")
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = None
        if uri:
            prompt_file = storage.fetch_prompt_file(uri, Path(tmp) / "prompts.txt")
            check_prompt_file(prompt_file, uri)
        distill_config_from_spec(
            spec,
            output_dir=str(Path(tmp) / "run"),
            teacher_path=None,
            prompt_file=None if prompt_file is None else str(prompt_file),
        )
        parallel_config_from_spec(spec)


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


def resolve_teacher(job_id: str, spec: dict) -> str:
    """The teacher's S3 URI (or builtin:shapes), after checking that it can be read and fits the dataset.

    builtin:shapes stays as it is: the workers load the teacher shipped inside rcm_core (rcm_core/assets), which
    every worker image has, so there is nothing to upload and no second copy to keep in step with the package.
    """
    uri = spec["teacher"]["uri"]
    if uri == BUILTIN_SHAPES:
        from rcm_core.pipeline import SHIPPED_SHAPES_TEACHER

        _check_teacher(SHIPPED_SHAPES_TEACHER, spec)
        return uri
    bucket = os.environ["RCM_CHECKPOINT_BUCKET"]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "teacher.safetensors"
        if uri == "builtin:toy2d":  # train the built-in 2-D teacher once and cache it in S3
            uri = f"s3://{bucket}/teachers/builtin-toy2d.safetensors"
            try:
                storage.download(uri, local)
            except storage.TeacherUnavailable:
                _train_builtin(local)
                storage.upload(local, uri)
        elif uri.startswith("s3://"):
            storage.download(uri, local)
        else:
            raise ConfigError(f"teacher.uri: unsupported {uri!r}")
        _check_teacher(local, spec)
    return uri


def _check_teacher(path: Path, spec: dict) -> None:
    """Load the teacher file as the workers will; its task must be the dataset's."""
    from rcm_core.shapes_teacher import load_shapes_teacher
    from rcm_core.teacher import load_toy2d_teacher, read_teacher_meta

    task = "shapes" if spec["data"]["dataset"] == "shapes" else "toy2d"
    try:
        found = read_teacher_meta(path).get("task", "toy2d")
        if found != task:
            raise ConfigError(
                f"teacher.uri {spec['teacher']['uri']}: a {found!r} teacher cannot be distilled on data.dataset "
                f"{spec['data']['dataset']!r}"
            )
        (load_shapes_teacher if task == "shapes" else load_toy2d_teacher)(path)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001  (any parse error means the file is not a teacher)
        raise ConfigError(
            f"teacher.uri {spec['teacher']['uri']}: not a valid teacher file ({type(exc).__name__})"
        ) from None


def _train_builtin(dest: Path) -> None:
    from rcm_core.config import toy2d_rcm
    from rcm_core.teacher import save_teacher, train_toy2d_teacher

    cfg = toy2d_rcm()
    net, record = train_toy2d_teacher(cfg.data, cfg.model, cfg.teacher)
    meta = {
        "task": "toy2d",
        "parameterization": "rf",
        "data": cfg.data.__dict__,
        "model": cfg.model.__dict__,
        "training": record,
    }
    save_teacher(net, dest, meta)


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
        check_inputs(spec)
        teacher_uri = resolve_teacher(job_id, spec)
    except (ConfigError, storage.TeacherUnavailable, storage.PromptFileUnavailable) as exc:
        print(f"rcm-worker: error: {exc}", file=sys.stderr, flush=True)
        return 1
    from workers.launch import build_trainer

    print(
        f"rcm-worker: job {job_id}: teacher {teacher_uri}; starting {spec['resources']['num_workers']} worker(s)",
        flush=True,
    )
    result = build_trainer(job_id, spec, teacher_uri).fit()
    if result.error is not None:
        print(f"rcm-worker: training error (full): {result.error}", flush=True)  # the cluster's log, for operators
        print(f"rcm-worker: error: training failed: {public_error(result.error)}", file=sys.stderr, flush=True)
        return 1
    print(f"rcm-worker: job {job_id} finished at {result.metrics}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
