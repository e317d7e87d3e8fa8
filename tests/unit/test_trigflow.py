"""TrigFlow identities and the RF -> TrigFlow conversion checked against finite differences of the ODE."""

import math

import torch

from rcm_core import trigflow


def test_x0_and_eps_recovered_from_true_f():
    x0, eps = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * (math.pi / 2)
    x_t = trigflow.add_noise(x0, eps, t)
    f = trigflow.target_f(x0, eps, t)
    torch.testing.assert_close(trigflow.x0_from_f(x_t, f, t), x0)
    torch.testing.assert_close(trigflow.eps_from_f(x_t, f, t), eps)


def test_pf_ode_velocity_is_f():
    """d/dt (cos t x0 + sin t eps) = F for fixed (x0, eps), by central differences."""
    x0, eps = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64) * 1.4 + 0.05
    h = 1e-6
    fd = (trigflow.add_noise(x0, eps, t + h) - trigflow.add_noise(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, trigflow.target_f(x0, eps, t), atol=1e-8, rtol=1e-7)


def test_rf_time_round_trip_and_endpoints():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    t = trigflow.trigflow_time_from_rf(s)
    torch.testing.assert_close(trigflow.rf_time_from_trigflow(t), s)
    assert t[0].item() == 0.0 and abs(t[-1].item() - math.pi / 2) < 1e-15
    # SNR matching: tan t = s / (1 - s)
    torch.testing.assert_close(torch.tan(t[1:-1]), s[1:-1] / (1 - s[1:-1]))


def _rf_velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """An arbitrary smooth, non-linear RF velocity field v(x, s)."""
    w = torch.tensor([[0.7, -1.1], [0.4, 0.9]], dtype=torch.float64)
    return torch.tanh(x @ w) * (1 + s[:, None]) + torch.sin(3 * s)[:, None]


def _rk4_rf(x: torch.Tensor, s0: torch.Tensor, s1: torch.Tensor, n: int = 64) -> torch.Tensor:
    h = (s1 - s0) / n
    s = s0.clone()
    for _ in range(n):
        k1 = _rf_velocity(x, s)
        k2 = _rf_velocity(x + 0.5 * h[:, None] * k1, s + 0.5 * h)
        k3 = _rf_velocity(x + 0.5 * h[:, None] * k2, s + 0.5 * h)
        k4 = _rf_velocity(x + h[:, None] * k3, s + h)
        x = x + h[:, None] / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        s = s + h
    return x


def test_rf_conversion_matches_finite_differences_of_the_trigflow_ode():
    """Follow an RF trajectory, map it to TrigFlow, and differentiate in t: the slope must equal the converted F."""
    torch.manual_seed(1)
    t = torch.rand(32, dtype=torch.float64) * 1.3 + 0.1
    x_t = torch.randn(32, 2, dtype=torch.float64)
    s = trigflow.rf_time_from_trigflow(t)
    x_s = x_t * trigflow.rf_input_scale(t)[:, None]
    f = trigflow.f_from_rf_velocity(x_s, _rf_velocity(x_s, s), t)

    h = 1e-4
    traj = []
    for tt in (t + h, t - h):
        x_s_moved = _rk4_rf(x_s, s, trigflow.rf_time_from_trigflow(tt))
        traj.append(x_s_moved / trigflow.rf_input_scale(tt)[:, None])  # back to TrigFlow: x_t = (cos + sin) x_s
    fd = (traj[0] - traj[1]) / (2 * h)
    torch.testing.assert_close(fd, f, atol=1e-6, rtol=1e-6)


def test_rf_conversion_of_the_true_velocity_gives_the_true_f():
    x0, eps = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64) * 1.5
    s = trigflow.rf_time_from_trigflow(t)[:, None]
    x_s = (1 - s) * x0 + s * eps
    x_t = trigflow.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t * trigflow.rf_input_scale(t)[:, None], x_s)
    torch.testing.assert_close(trigflow.f_from_rf_velocity(x_s, eps - x0, t), trigflow.target_f(x0, eps, t))


def test_lognormal_time_distribution():
    gen = torch.Generator().manual_seed(0)
    t = trigflow.sample_lognormal_time(100_000, -0.8, 1.6, generator=gen)
    assert t.dtype == torch.float64 and 0 < t.min() and t.max() < math.pi / 2
    log_tan = torch.log(torch.tan(t))
    assert abs(log_tan.mean().item() + 0.8) < 0.02 and abs(log_tan.std().item() - 1.6) < 0.02
