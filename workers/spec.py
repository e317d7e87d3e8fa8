"""The job spec (JSON, validated by the service) -> rcm_core's DistillConfig and ParallelConfig, in one place."""

from __future__ import annotations

from typing import Any

from rcm_core.config import ConfigError, DistillConfig, config_from_dict, shapes_rcm, toy2d_rcm
from rcm_core.parallel.parallel_dims import ParallelConfig

# The evaluation of a job whose spec leaves `eval` fields unset (the student is always sampled at 1, 2, 4 steps).
# 2-D: what the worker has always used. Shapes: every benchmark prompt once, the teacher at 4 Euler steps only
# (CFG: 2 network calls per step; 50 steps on a 2-core CPU take minutes).
EVAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "toy2d": {"num_samples": 2000, "teacher_steps": [1, 4, 32]},
    "shapes": {"num_samples": 126, "teacher_steps": [4]},
}


def distill_config_from_spec(
    spec: dict[str, Any], *, output_dir: str, teacher_path: str | None, prompt_file: str | None = None
) -> DistillConfig:
    """Map the service's JobCreate dict onto DistillConfig (raises rcm_core.config.ConfigError when invalid).

    Args:
        prompt_file: local copy of the spec's data.prompt_file_uri (the worker downloads it), or None.
    """
    m, s, t = spec["method"], spec["schedule"], spec["teacher"]
    task = "shapes" if spec["data"]["dataset"] == "shapes" else "toy2d"
    data: dict[str, Any] = {"dataset": spec["data"]["dataset"]}
    if prompt_file is not None:
        data["prompt_file"] = prompt_file
    given = spec.get("eval", {})  # absent from specs stored before the service had an `eval` section
    e = {**EVAL_DEFAULTS[task], **{k: v for k, v in given.items() if v is not None}}
    return config_from_dict(
        {
            "task": task,
            "data": data,
            "teacher": {
                "path": teacher_path,
                "parameterization": t["parameterization"],
                "guidance_scale": t["guidance_scale"],
            },
            "loss": {
                k: m[k]
                for k in (
                    "scm_weight",
                    "dmd_weight",
                    "p_mean",
                    "p_std",
                    "tangent_warmup_steps",
                    "time_derivative",
                    "fd_step",
                    "max_rollout_steps",
                    "critic_ratio",
                )
            },
            "optim": {"lr": m["lr"], "fake_lr": m["fake_lr"], "ema_sigma_rel": m["ema_sigma_rel"]},
            "train": {
                "steps": s["steps"],
                "batch_size": s["batch_size"],
                "seed": s["seed"],
                "log_every": s["log_every"],
                "checkpoint_every": s["checkpoint_every"],
                "max_minutes": s.get("max_minutes") or 0.0,  # absent from specs stored before the field existed
                "output_dir": output_dir,
            },
            "eval": {
                "num_samples": e["num_samples"],
                "teacher_steps": e["teacher_steps"],
                "student_steps": [1, 2, 4],
                "diversity_samples": e.get("diversity_samples", 8),
                **({"student_mid_times": e["student_mid_times"]} if e.get("student_mid_times") else {}),
            },
        },
        base=shapes_rcm() if task == "shapes" else toy2d_rcm(),  # the preset supplies what the spec does not set
    )


def parallel_config_from_spec(spec: dict[str, Any]) -> ParallelConfig:
    """resources -> ParallelConfig: fsdp_degree ranks split the batch (FSDP2 shards the weights over all of them
    and the cp_degree ranks alike), cp_degree ranks split each sample's tokens."""
    r = spec["resources"]
    try:
        return ParallelConfig(
            dp_shard_degree=r["fsdp_degree"],
            cp_degree=r["cp_degree"],
            activation_checkpoint=r["activation_checkpointing"],
        )
    except ValueError as exc:
        raise ConfigError(f"resources: {exc}") from None
