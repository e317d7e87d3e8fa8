"""DMD: distribution matching distillation (reverse divergence) with a flow-matching fake score.

References: DMD2 (Yin et al., arXiv 2405.14867, Eq. 2-3 and Sec. 4.1, two time-scale updates);
rCM (arXiv 2510.08431, Sec. 3: L_rCM = L_sCM + lambda * L_DMD, rollout with gradient through the last step).

Generator: for a student sample G = x0_student, noise it to x_t, compare the fake score's and the CFG
teacher's denoised estimates and push G along
    grad = (x0_fake - x0_teacher_cfg) / mean|x0_student - x0_teacher_cfg|,
through the surrogate loss ||G - stopgrad(G - grad)||^2, summed over a sample's elements like L_sCM (its
gradient in G is 2 * grad / batch size).
Critic: the fake score learns the student's distribution by flow matching on detached student samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rcm_core import trigflow
from rcm_core.config import LossConfig
from rcm_core.losses.scm import per_sample_sum

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> F


def rollout_times(
    num_steps: int, batch_size: int, config: LossConfig, *, generator: torch.Generator | None, device=None
) -> list[torch.Tensor]:
    """pi/2 followed by num_steps - 1 random decreasing times (per sample), each (B,) float64."""
    times = [torch.full((batch_size,), trigflow.T_MAX, dtype=torch.float64, device=device)]
    if num_steps > 1:
        draws = torch.stack(
            [
                trigflow.sample_uniform_rf_time(
                    batch_size, config.dmd_s_min, config.dmd_s_max, generator=generator, device=device
                )
                for _ in range(num_steps - 1)
            ]
        )  # (N-1, B)
        times += list(draws.sort(dim=0, descending=True).values)
    return times


def rollout(
    student_fn: ModelFn, noise: torch.Tensor, times: list[torch.Tensor], *, generator: torch.Generator | None
) -> torch.Tensor:
    """Few-step student sampling from pure noise at t = pi/2, re-noising between steps.

    Only the final step keeps the autograd graph: earlier steps run under no_grad (rCM Sec. 4).
    """
    x_t = noise
    for i, t in enumerate(times):
        last = i == len(times) - 1
        with torch.set_grad_enabled(last and torch.is_grad_enabled()):
            x0 = trigflow.x0_from_f(x_t, student_fn(x_t, t), t)
        if not last:
            eps = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
            x_t = trigflow.add_noise(x0, eps, times[i + 1])
    return x0


def dmd_loss(
    x0_student: torch.Tensor,
    teacher_fn: ModelFn,
    fake_fn: ModelFn,
    *,
    t: torch.Tensor,
    eps: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_DMD for student samples (with graph) at noise levels t (B,); teacher_fn applies CFG."""
    with torch.no_grad():
        x_t = trigflow.add_noise(x0_student.detach(), eps, t)
        x0_fake = trigflow.x0_from_f(x_t, fake_fn(x_t, t), t)
        x0_teacher = trigflow.x0_from_f(x_t, teacher_fn(x_t, t), t)
        # DMD2's normaliser: per-sample mean absolute distance to the teacher's estimate.
        dims = tuple(range(1, x0_student.dim()))
        norm = (x0_student.detach() - x0_teacher).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
        grad = (x0_fake - x0_teacher) / norm
        target = x0_student.detach() - grad
    loss = per_sample_sum((x0_student - target).square()).mean()
    return loss, {"dmd_loss": loss.detach(), "dmd_grad_rms": grad.float().square().mean().sqrt()}


def fake_score_loss(
    fake: nn.Module, x0_student: torch.Tensor, cond, *, t: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow matching of the fake score on detached student samples: ||F_fake(x_t) - (cos t eps - sin t x0)||^2."""
    x0 = x0_student.detach()
    x_t = trigflow.add_noise(x0, eps, t)
    loss = (fake(x_t, t, cond) - trigflow.target_f(x0, eps, t)).square().mean()
    return loss, {"fake_score_loss": loss.detach()}
