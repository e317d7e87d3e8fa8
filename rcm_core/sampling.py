"""Samplers: the few-step consistency sampler for students and the Euler (DDIM) sampler for teachers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from rcm_core import trigflow
from rcm_core.config import check_mid_times

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> F

DEFAULT_MID_TIMES = (1.5, 1.4, 1.0)  # intermediate times of the 4-step schedule; fewer steps take a prefix
DEFAULT_STUDENT_TIMES = (math.pi / 2, *DEFAULT_MID_TIMES)


def student_times(num_steps: int, mid_times: tuple[float, ...] | list[float] = DEFAULT_MID_TIMES) -> list[float]:
    """Sampling times for `num_steps` student steps: pi/2 followed by a prefix of `mid_times` (decreasing).

    The intermediate times are an inference choice of the few-step sampler (the consistency function is defined
    at every t); beyond len(mid_times) + 1 steps the schedule continues evenly from the last one down to 0.2.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    check_mid_times(mid_times)
    times = [math.pi / 2, *mid_times]
    if num_steps <= len(times):
        return times[:num_steps]
    extra, last = num_steps - len(times), times[-1]
    return times + [last - (last - 0.2) * (i + 1) / extra for i in range(extra)]


@torch.no_grad()
def sample_consistency(
    model_fn: ModelFn, noise: torch.Tensor, times: list[float], *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multistep consistency sampling: x0 = f(x_t, t_i), then re-noise to t_{i+1} with fresh noise."""
    b = noise.shape[0]
    x_t = noise  # at t = pi/2, x_t = eps
    for i, t_val in enumerate(times):
        t = torch.full((b,), t_val, dtype=torch.float64, device=noise.device)
        x0 = trigflow.x0_from_f(x_t, model_fn(x_t, t), t)
        if i + 1 < len(times):
            eps = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
            x_t = trigflow.add_noise(x0, eps, torch.full_like(t, times[i + 1]))
    return x0


@torch.no_grad()
def sample_euler(model_fn: ModelFn, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Deterministic first-order sampler on a grid uniform in RF time s (1 -> 0).

    The DDIM step x_{t'} = cos t' * x0_hat + sin t' * eps_hat is, in RF coordinates, exactly the Euler
    step x_{s'} = x_s + (s' - s) * v: this is the usual "N Euler steps" of a rectified-flow teacher.
    """
    b = noise.shape[0]
    s_grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    t_grid = trigflow.trigflow_time_from_rf(s_grid)
    x_t = noise
    for i in range(num_steps):
        t = torch.full((b,), float(t_grid[i]), dtype=torch.float64, device=noise.device)
        f = model_fn(x_t, t)
        x0, eps = trigflow.x0_from_f(x_t, f, t), trigflow.eps_from_f(x_t, f, t)
        t_next = torch.full_like(t, float(t_grid[i + 1]))
        x_t = trigflow.add_noise(x0, eps, t_next)
    return x_t
