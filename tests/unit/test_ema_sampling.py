"""EDM2 power-function EMA and the samplers."""

import math

import pytest
import torch

from rcm_core import trigflow
from rcm_core.ema import PowerFunctionEMA, sigma_rel_to_gamma
from rcm_core.sampling import sample_consistency, sample_euler, student_times


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2])
def test_sigma_rel_inverts(sigma_rel):
    g = sigma_rel_to_gamma(sigma_rel)
    assert math.isclose(((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5, sigma_rel, rel_tol=1e-9)


def test_ema_is_a_power_function_average():
    """With parameter values 1, 2, ..., n the average is sum_k k * w_k for weights proportional to k^gamma."""
    lin = torch.nn.Linear(1, 1, bias=False)
    ema = PowerFunctionEMA(lin, sigma_rel=0.1)
    n = 50
    for k in range(1, n + 1):
        with torch.no_grad():
            lin.weight.fill_(float(k))
        ema.update(lin)
    g = ema.gamma
    # beta_n = (1 - 1/n)^(g+1) is the recursion of a running average with weights ~ k^g (EDM2 Eq. 3), up to O(1/n)
    weights = torch.arange(1, n + 1, dtype=torch.float64) ** g
    expected = (weights * torch.arange(1, n + 1)).sum() / weights.sum()
    assert abs(ema.model.weight.item() - expected.item()) < 0.02 * n


def test_ema_first_update_copies_model():
    lin = torch.nn.Linear(2, 2)
    ema = PowerFunctionEMA(lin, 0.05)
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    torch.testing.assert_close(ema.model.weight, lin.weight)


def test_student_times_are_prefixes():
    assert student_times(4) == [math.pi / 2, 1.5, 1.4, 1.0]
    assert student_times(1) == [math.pi / 2] and student_times(2) == [math.pi / 2, 1.5]
    t6 = student_times(6)
    assert len(t6) == 6 and all(a > b for a, b in zip(t6, t6[1:], strict=False))
    with pytest.raises(ValueError):
        student_times(0)


def test_student_times_take_custom_mid_times():
    assert student_times(2, (1.1, 0.8, 0.5)) == [math.pi / 2, 1.1]
    assert student_times(4, [1.1, 0.8, 0.5]) == [math.pi / 2, 1.1, 0.8, 0.5]
    t6 = student_times(6, (1.1, 0.8, 0.5))
    assert t6[:4] == [math.pi / 2, 1.1, 0.8, 0.5] and t6[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(t6, t6[1:], strict=False))
    for bad in ((1.0, 1.2), (1.7,), (0.1,), ()):
        with pytest.raises(ValueError):
            student_times(2, bad)


def test_perfect_consistency_function_samples_the_data_point():
    """If f(x_t, t) = x0 for every t, any number of steps returns x0."""
    x0 = torch.tensor([[0.5, -1.0]]).repeat(16, 1)

    def model(x_t, t):  # F such that x0_hat = x0: F = (cos t x_t - x0) / sin t
        return ((torch.cos(t)[:, None] * x_t - x0) / torch.sin(t)[:, None]).float()

    for n in (1, 2, 4):
        out = sample_consistency(
            model, torch.randn(16, 2), student_times(n), generator=torch.Generator().manual_seed(0)
        )
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_euler_sampler_is_exact_for_a_point_mass():
    """For a point mass at x0 the true F makes every Euler/DDIM step exact."""
    x0 = torch.tensor([[1.0, 2.0]], dtype=torch.float64).repeat(8, 1)
    noise = torch.randn(8, 2, dtype=torch.float64)

    def model(x_t, t):
        eps = (x_t - torch.cos(t)[:, None] * x0) / torch.sin(t)[:, None]
        return trigflow.target_f(x0, eps, t)

    torch.testing.assert_close(sample_euler(model, noise, 3), x0)
