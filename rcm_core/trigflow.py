"""TrigFlow time parametrisation and conversion of rectified-flow teachers.

TrigFlow (sCM, Lu & Song 2024, arXiv 2410.11081, Sec. 2; rCM, arXiv 2510.08431, Sec. 2):
    x_t = cos(t) * x0 + sin(t) * eps,      t in [0, pi/2], sigma_d = 1 (data normalised to unit scale)
The network predicts F; the denoised estimate and the probability-flow ODE are
    x0_hat = cos(t) * x_t - sin(t) * F,    dx_t/dt = F.
For the true F = cos(t) * eps - sin(t) * x0 both identities hold exactly.

Rectified flow (Wan, Cosmos, FLUX): x_s = (1 - s) * x0 + s * eps with velocity v = eps - x0.
Matching the signal-to-noise ratio gives tan(t) = s / (1 - s), hence
    s = sin t / (cos t + sin t),   x_s = x_t / (cos t + sin t),   F = (cos t - sin t) * x_s + v / (cos t + sin t).
The coefficients are computed in float64 so that a finite-difference time step of 1e-4 is resolved.
"""

from __future__ import annotations

import math

import torch

T_MAX = math.pi / 2  # pure noise
T_MIN = 0.0  # clean data


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) coefficient to broadcast against a (B, ...) tensor."""
    return coef.reshape(coef.shape[0], *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward process x_t = cos t * x0 + sin t * eps (t of shape (B,))."""
    t64 = t.double()
    return (_bcast(torch.cos(t64), x0) * x0.double() + _bcast(torch.sin(t64), x0) * eps.double()).to(x0.dtype)


def target_f(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target of F: dx_t/dt = cos t * eps - sin t * x0."""
    t64 = t.double()
    return (_bcast(torch.cos(t64), x0) * eps.double() - _bcast(torch.sin(t64), x0) * x0.double()).to(x0.dtype)


def x0_from_f(x_t: torch.Tensor, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Denoised estimate x0_hat = cos t * x_t - sin t * F (the consistency function f_theta)."""
    t64 = t.double()
    out = _bcast(torch.cos(t64), x_t) * x_t.double() - _bcast(torch.sin(t64), x_t) * f.double()
    return out.to(f.dtype)


def eps_from_f(x_t: torch.Tensor, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise estimate eps_hat = sin t * x_t + cos t * F."""
    t64 = t.double()
    out = _bcast(torch.sin(t64), x_t) * x_t.double() + _bcast(torch.cos(t64), x_t) * f.double()
    return out.to(f.dtype)


def rf_time_from_trigflow(t: torch.Tensor) -> torch.Tensor:
    """SNR matching tan t = s / (1 - s)  =>  s = sin t / (cos t + sin t) (float64)."""
    t64 = t.double()
    return torch.sin(t64) / (torch.cos(t64) + torch.sin(t64))


def trigflow_time_from_rf(s: torch.Tensor) -> torch.Tensor:
    """Inverse of `rf_time_from_trigflow`: t = atan2(s, 1 - s) (float64)."""
    s64 = s.double()
    return torch.atan2(s64, 1.0 - s64)


def rf_input_scale(t: torch.Tensor) -> torch.Tensor:
    """x_s = x_t * 1 / (cos t + sin t) (float64)."""
    t64 = t.double()
    return 1.0 / (torch.cos(t64) + torch.sin(t64))


def f_from_rf_velocity(x_s: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """F = (cos t - sin t) * x_s + v / (cos t + sin t), from the RF velocity v = eps - x0 at s(t)."""
    t64 = t.double()
    c, s = torch.cos(t64), torch.sin(t64)
    out = _bcast(c - s, x_s) * x_s.double() + _bcast(1.0 / (c + s), v) * v.double()
    return out.to(v.dtype)


def sample_lognormal_time(
    batch_size: int, p_mean: float, p_std: float, *, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """sCM's training-time proposal: tan t = exp(tau), tau ~ N(P_mean, P_std^2) (sigma_d = 1). float64."""
    tau = torch.randn(batch_size, generator=generator, dtype=torch.float64, device=device) * p_std + p_mean
    return torch.atan(torch.exp(tau))


def sample_uniform_rf_time(
    batch_size: int, s_min: float, s_max: float, *, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """TrigFlow times whose RF time s is uniform in [s_min, s_max] (DMD and fake-score noise levels). float64."""
    s = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=device) * (s_max - s_min) + s_min
    return trigflow_time_from_rf(s)
