"""Build the Ray Train `TorchTrainer` for a job: run name = job id, storage on S3, retries on failure."""

from __future__ import annotations

import os
from typing import Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from workers.spec import JobConfig
from workers.storage import s3_filesystem
from workers.train_loop import train_loop_per_worker

MAX_FAILURES = 3  # worker crashes tolerated per job; each restart resumes from the latest checkpoint


def build_trainer(
    job_id: str, job: JobConfig, spec: dict[str, Any], teacher_uri: str, source: str, teacher_family: str | None = None
) -> TorchTrainer:
    """Args: job: the converted spec (sizes the cluster); spec: the raw one, which every worker converts again
    (with teacher_family, the diffusers family the entrypoint read from the teacher's config.json)."""
    config = {
        "job_id": job_id,
        "spec": spec,
        "teacher_uri": teacher_uri,
        "teacher_source": source,
        "teacher_family": teacher_family,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu),
        run_config=RunConfig(
            name=job_id,  # re-running the same job id resumes from its latest checkpoint
            storage_path=f"{os.environ['RCM_CHECKPOINT_BUCKET']}/ray",
            storage_filesystem=s3_filesystem(),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=3),
        ),
    )
