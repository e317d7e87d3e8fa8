"""sCM: continuous-time consistency distillation in TrigFlow with tangent normalisation.

References: sCM (Lu & Song, arXiv 2410.11081, Eq. 8 and Sec. 4: tangent warm-up, normalisation);
rCM (arXiv 2510.08431, Sec. 3-4: semi-continuous time, float32 time path).

With the consistency function f(x_t, t) = cos t * x_t - sin t * F(x_t, t) and the teacher's PF-ODE
dx_t/dt = F_teacher (with CFG), the tangent of the stop-gradient student F_minus is

    g = -cos t * sqrt(1 - r^2 sin^2 t) * (F_minus - F_teacher) - (r cos t sin t * x_t + cos t sin t * dF_minus/dt)

At r = 1 this is exactly cos t * df_minus/dt; r ramps 0 -> 1 over the tangent warm-up. The loss
||F_theta - F_minus - g / (||g||_2 + c)||^2 has gradient -2 * g_normalised * dF_theta/dtheta at theta = theta_minus,
i.e. it moves the student along the consistency direction with a bounded step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rcm_core import trigflow
from rcm_core.config import LossConfig

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> F


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """r in [0, 1]: linear ramp over `warmup_steps` student updates (sCM Sec. 4.2)."""
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


@torch.no_grad()
def student_time_derivative(
    model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor, dxt_dt: torch.Tensor, *, mode: str, fd_step: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """F_minus and its total derivative dF/dt = dF/dx * dx_t/dt + dF/dt along the teacher ODE.

    `exact`: one forward-mode JVP with tangents (dx_t/dt, 1).
    `semi_continuous`: JVP in x only, plus a central finite difference in t with step `fd_step`
    (the time path is float32, so the 1e-4 step is resolved; rCM Sec. 4).
    """
    if mode == "exact":
        return torch.func.jvp(model_fn, (x_t, t), (dxt_dt, torch.ones_like(t)))
    if mode != "semi_continuous":
        raise ValueError(f"unknown time_derivative mode {mode!r}")
    f_minus, df_spatial = torch.func.jvp(lambda x: model_fn(x, t), (x_t,), (dxt_dt,))
    df_time = (model_fn(x_t, t + fd_step) - model_fn(x_t, t - fd_step)) / (2 * fd_step)
    return f_minus, df_spatial + df_time


def scm_tangent(
    x_t: torch.Tensor, t: torch.Tensor, f_minus: torch.Tensor, f_teacher: torch.Tensor, df_dt: torch.Tensor, r: float
) -> torch.Tensor:
    """g of the module docstring, evaluated in float64 per sample and returned in f_minus's dtype."""
    t64 = trigflow._bcast(t.double(), x_t)
    cos, sin = torch.cos(t64), torch.sin(t64)
    g = -cos * torch.sqrt(1 - r**2 * sin**2) * (f_minus.double() - f_teacher.double())
    g = g - (r * cos * sin * x_t.double() + cos * sin * df_dt.double())
    return g.to(f_minus.dtype)


def normalize_tangent(g: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """g / (||g||_2 + c) per sample, with ||g||_2 the plain L2 norm over the sample's elements (sCM, rCM).

    Returns (g_hat, ||g||_2). With the per-sample *summed* squared error of `scm_loss` this is the paper's scaling,
    so the DMD weight lambda means what it means there (see `scm_loss`).
    """
    norm = g.flatten(1).norm(dim=1)  # (B,)
    return g / trigflow._bcast(norm + c, g), norm


def scm_loss(
    student: nn.Module,
    teacher_fn: ModelFn,
    x0: torch.Tensor,
    cond,
    *,
    t: torch.Tensor,
    eps: torch.Tensor,
    r: float,
    config: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
    """L_sCM for a batch of data x0 (B, ...), noise eps and TrigFlow times t (B,).

    Args:
        student: the F-predictor F_theta(x_t, t, cond) being trained.
        teacher_fn: (x_t, t) -> F_teacher with CFG applied (dx_t/dt of the teacher's PF-ODE).
        r: tangent warm-up factor in [0, 1].
    Returns:
        (loss, metrics) with the loss differentiable in the student's parameters; metrics are detached tensors
        (no host sync here).

    Scaling (as the published rCM code): the squared error is summed over a sample's N elements and averaged
    over the batch, with the tangent normalised by its plain L2 norm. Its gradient entries are then
    O(1/sqrt(N)) while DMD's (same reduction) are O(1), so lambda * L_DMD weighs about lambda * sqrt(N) against
    L_sCM per element: the paper's lambda = 0.01 on 480p video latents (N ~ 2e6) makes DMD's push ~14x the
    tangent's, and on 32x32 RGB images (N = 3072) ~0.55x. A mean-reduced, RMS-normalised variant would shrink
    DMD's share by sqrt(N) and silently turn rCM into sCM on large inputs.
    """
    x_t = trigflow.add_noise(x0, eps, t)
    with torch.no_grad():
        dxt_dt = teacher_fn(x_t, t)  # (B, ...) F_teacher, the PF-ODE velocity
        f_minus, df_dt = student_time_derivative(
            lambda x, tt: student(x, tt, cond), x_t, t, dxt_dt, mode=config.time_derivative, fd_step=config.fd_step
        )
        g = scm_tangent(x_t, t, f_minus, dxt_dt, df_dt, r)
        g_hat, g_norm = normalize_tangent(g, config.tangent_norm_c)
    f_theta = student(x_t, t, cond)
    loss = per_sample_sum((f_theta - f_minus - g_hat).square()).mean()
    metrics = {"scm_loss": loss.detach(), "tangent_norm": g_norm.mean(), "tangent_warmup_r": r}
    return loss, metrics


def per_sample_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the batch: the reduction of the published rCM losses (sCM and DMD alike)."""
    return x.flatten(1).sum(dim=1)
