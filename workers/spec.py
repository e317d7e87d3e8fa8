"""The job spec (JSON, validated by the service) -> rcm_core's DistillConfig, in one place."""

from __future__ import annotations

from typing import Any

from rcm_core.config import DistillConfig, config_from_dict


def distill_config_from_spec(spec: dict[str, Any], *, output_dir: str, teacher_path: str | None) -> DistillConfig:
    """Map the service's JobCreate dict onto DistillConfig (raises rcm_core.config.ConfigError when invalid)."""
    m, s, t = spec["method"], spec["schedule"], spec["teacher"]
    return config_from_dict(
        {
            "data": {"dataset": spec["data"]["dataset"]},
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
                "output_dir": output_dir,
            },
        }
    )
