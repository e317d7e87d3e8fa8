"""sCM tangent, semi-continuous time derivative, float32 time path, DMD and rollout."""

import math

import pytest
import torch

from rcm_core import trigflow
from rcm_core.config import LossConfig
from rcm_core.losses.dmd import dmd_loss, fake_score_loss, rollout, rollout_times
from rcm_core.losses.scm import normalize_tangent, scm_loss, scm_tangent, student_time_derivative, tangent_warmup
from rcm_core.models.dit import DiT, dit_debug


def _perturbed_dit(time_dtype=torch.float32) -> DiT:
    torch.manual_seed(0)
    model = DiT(dit_debug(), time_dtype=time_dtype)
    with torch.no_grad():  # move off the adaLN-zero / zero-output init so every path contributes
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _dit_inputs(b=4):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(b, 3, 8, 8, generator=gen)
    t = torch.rand(b, generator=gen, dtype=torch.float64) * 1.2 + 0.2
    tokens = torch.randn(b, 5, 32, generator=gen)
    v = torch.randn(b, 3, 8, 8, generator=gen)
    return x, t, {"tokens": tokens}, v


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_semi_continuous_matches_exact_with_float32_time_path():
    model = _perturbed_dit()
    x, t, cond, v = _dit_inputs()
    fn = lambda xx, tt: model(xx, tt, cond)  # noqa: E731
    f_exact, df_exact = student_time_derivative(fn, x, t, v, mode="exact", fd_step=1e-4)
    f_semi, df_semi = student_time_derivative(fn, x, t, v, mode="semi_continuous", fd_step=1e-4)
    torch.testing.assert_close(f_semi, f_exact)
    assert _rel(df_semi, df_exact) < 2e-2
    # The time part is a real contribution (not negligible next to the spatial part).
    _, df_spatial = torch.func.jvp(lambda xx: fn(xx, t), (x,), (v,))
    assert _rel(df_spatial, df_exact) > 0.05


def test_bf16_time_path_loses_the_finite_difference():
    """With t cast to bf16 before the embedding (as in published code), t +- 1e-4 round to the same value."""
    model = _perturbed_dit(time_dtype=torch.bfloat16)
    x, t, cond, v = _dit_inputs()
    fn = lambda xx, tt: model(xx, tt, cond)  # noqa: E731
    df_time = (fn(x, t + 1e-4) - fn(x, t - 1e-4)) / 2e-4
    assert df_time.abs().max().item() == 0.0
    reference = _perturbed_dit()
    ref_fn = lambda xx, tt: reference(xx, tt, cond)  # noqa: E731
    _, df_exact = student_time_derivative(ref_fn, x, t, v, mode="exact", fd_step=1e-4)
    _, df_semi_bf16 = student_time_derivative(fn, x, t, v, mode="semi_continuous", fd_step=1e-4)
    assert _rel(df_semi_bf16, df_exact) > 0.05


def _smooth_student(x, t):
    w = torch.tensor([[0.3, -0.8], [1.1, 0.2]], dtype=torch.float64)
    return torch.tanh(x @ w + torch.sin(2 * t)[:, None]) * torch.cos(t)[:, None] + 0.5 * x


def _teacher_velocity(x, t):
    return -x * torch.sin(t)[:, None] + torch.cos(3 * t)[:, None]


def test_tangent_at_r1_is_cos_t_times_total_derivative_of_consistency_function():
    """g(r=1) = cos t * d/dt f(x_t, t) along the teacher ODE, f = cos t x - sin t F_minus."""
    torch.manual_seed(0)
    x = torch.randn(16, 2, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 1.3 + 0.1
    v = _teacher_velocity(x, t)
    f_minus, df_dt = student_time_derivative(_smooth_student, x, t, v, mode="exact", fd_step=1e-4)
    g = scm_tangent(x, t, f_minus, v, df_dt, r=1.0)

    def consistency(xx, tt):
        return trigflow.x0_from_f(xx, _smooth_student(xx, tt), tt)

    h = 1e-5
    fd = (consistency(x + h * v, t + h) - consistency(x - h * v, t - h)) / (2 * h)
    torch.testing.assert_close(g, torch.cos(t)[:, None] * fd, atol=1e-7, rtol=1e-6)


def test_tangent_warmup_ramp_and_normalisation():
    assert tangent_warmup(0, 100) == 0.0 and tangent_warmup(50, 100) == 0.5 and tangent_warmup(500, 100) == 1.0
    assert tangent_warmup(0, 0) == 1.0
    g = torch.randn(8, 3, 4, 4) * 10
    g_hat, norm = normalize_tangent(g, c=0.1)
    expected = g.flatten(1).square().sum(1).sqrt()  # the plain L2 norm over C, H, W (as the published rCM)
    torch.testing.assert_close(norm, expected)
    torch.testing.assert_close(g_hat, g / (expected + 0.1)[:, None, None, None])
    assert (g_hat.flatten(1).norm(dim=1) < 1).all()


def test_scm_loss_gradient_follows_the_normalised_tangent():
    """At theta = theta_minus the loss is the per-sample sum of g_hat^2, averaged over the batch."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    student = lambda x, t, cond: lin(torch.cat([x, t[:, None]], 1))  # noqa: E731
    x0, eps = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64) + 0.2
    cfg = LossConfig()
    loss, metrics = scm_loss(student, _teacher_velocity, x0, None, t=t, eps=eps, r=1.0, config=cfg)
    assert loss.requires_grad and metrics["scm_loss"].item() == pytest.approx(loss.item())
    x_t = trigflow.add_noise(x0, eps, t)
    f_minus, df = student_time_derivative(
        lambda x, tt: student(x, tt, None), x_t, t, _teacher_velocity(x_t, t), mode="exact", fd_step=1e-4
    )
    g_hat, _ = normalize_tangent(scm_tangent(x_t, t, f_minus, _teacher_velocity(x_t, t), df, 1.0), 0.1)
    torch.testing.assert_close(loss, g_hat.square().sum(1).mean())


def test_dmd_gradient_in_sample_space():
    torch.manual_seed(0)
    x0 = torch.randn(6, 2, requires_grad=True)
    t = torch.full((6,), 0.7, dtype=torch.float64)
    eps = torch.randn(6, 2)
    teacher = lambda x, tt: 0.5 * x  # noqa: E731
    fake = lambda x, tt: -0.3 * x  # noqa: E731
    loss, _ = dmd_loss(x0, teacher, fake, t=t, eps=eps)
    loss.backward()
    x_t = trigflow.add_noise(x0.detach(), eps, t)
    x0_fake, x0_teacher = trigflow.x0_from_f(x_t, fake(x_t, t), t), trigflow.x0_from_f(x_t, teacher(x_t, t), t)
    grad = (x0_fake - x0_teacher) / (x0.detach() - x0_teacher).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x0.grad, 2 * grad / len(x0))  # summed over a sample, averaged over the batch


def _balance(numel: int) -> float:
    """||dL_DMD/dx|| / ||dL_sCM/dF|| per sample at theta = theta_minus, for samples of `numel` elements."""
    gen = torch.Generator().manual_seed(numel)
    b = 16
    x0, eps = torch.randn(b, numel, generator=gen), torch.randn(b, numel, generator=gen)
    t = torch.full((b,), 0.8, dtype=torch.float64)
    param = torch.zeros(b, numel, requires_grad=True)  # F_theta = param: dF/dtheta = identity
    student = lambda x, tt, cond: param + 0 * x  # noqa: E731
    loss, _ = scm_loss(student, lambda x, tt: 0.5 * x, x0, None, t=t, eps=eps, r=1.0, config=LossConfig())
    (g_scm,) = torch.autograd.grad(loss, param)
    x_student = torch.randn(b, numel, generator=gen, requires_grad=True)
    teacher, fake = (lambda x, tt: 0.5 * x), (lambda x, tt: -0.3 * x)  # noqa: E731
    loss, _ = dmd_loss(x_student, teacher, fake, t=t, eps=torch.randn(b, numel, generator=gen))
    (g_dmd,) = torch.autograd.grad(loss, x_student)
    return (g_dmd.norm(dim=1) / g_scm.norm(dim=1)).mean().item()


def test_dmd_weight_balance_grows_with_sqrt_numel_as_in_the_paper():
    """Published rCM scaling: the sCM gradient per sample has norm ~2 (L2-normalised tangent), DMD's grows with
    sqrt(N) (entries O(1), summed over N), so lambda = 0.01 weighs DMD more on larger inputs."""
    small, large = _balance(64), _balance(4096)
    assert 6.0 < large / small < 10.0  # sqrt(4096 / 64) = 8


def test_dmd_pushes_samples_towards_the_teacher():
    """Teacher denoises to 0, the fake score to the student's samples: descent moves samples towards 0."""
    x0 = torch.full((64, 2), 2.0, requires_grad=True)
    t = torch.full((64,), 0.3, dtype=torch.float64)
    eps = torch.zeros(64, 2)
    cos_over_sin = (torch.cos(t) / torch.sin(t))[:, None].float()
    teacher = lambda x, tt: x * cos_over_sin  # noqa: E731  x0_hat = cos t x - sin t F = 0
    fake = lambda x, tt: torch.zeros_like(x)  # noqa: E731  x0_hat = cos t x_t, close to the sample
    loss, _ = dmd_loss(x0, teacher, fake, t=t, eps=eps)
    loss.backward()
    assert (x0.grad > 0).all()


def test_fake_score_loss_is_zero_for_the_exact_score():
    x0, eps = torch.randn(32, 2), torch.randn(32, 2)
    t = torch.rand(32, dtype=torch.float64)
    exact = lambda x_t, tt, cond: trigflow.target_f(x0, eps, tt)  # noqa: E731
    loss, _ = fake_score_loss(exact, x0, None, t=t, eps=eps)
    assert loss.item() < 1e-10


@pytest.mark.parametrize("num_steps", [1, 3])
def test_rollout_keeps_gradient_only_through_the_last_step(num_steps):
    lin = torch.nn.Linear(2, 2)
    grad_calls = []

    def student(x, t):
        grad_calls.append(torch.is_grad_enabled())
        return lin(x)

    gen = torch.Generator().manual_seed(0)
    times = rollout_times(num_steps, 8, LossConfig(), generator=gen)
    assert times[0].eq(math.pi / 2).all() and len(times) == num_steps
    for a, b in zip(times, times[1:], strict=False):
        assert (a > b).all()
    out = rollout(student, torch.randn(8, 2), times, generator=gen)
    assert grad_calls == [False] * (num_steps - 1) + [True]
    out.sum().backward()
    assert lin.weight.grad is not None
