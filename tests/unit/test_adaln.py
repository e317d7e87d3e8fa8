"""rcm_core.models.adaln: LayerNorm + adaLN modulation as one op with written-out jvp and backward rules."""

import pytest
import torch
from torch import nn

from rcm_core.models.adaln import layer_norm_modulate
from rcm_core.models.dit import DiT, dit_debug, modulate

NORM = nn.LayerNorm(16, elementwise_affine=False, eps=1e-6)


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(2, 5, 16, generator=g, dtype=torch.float64) + 1).to(dtype)
    shift, scale = (0.5 * torch.randn(2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    return x, shift, scale


def test_rules_pass_gradcheck_in_both_modes():
    """float64: forward-mode and reverse-mode derivatives against finite differences, every input."""
    x, shift, scale = (t.requires_grad_() for t in _inputs(torch.float64))
    fn = lambda a, b, c: layer_norm_modulate(NORM, a, b, c)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, shift, scale), check_forward_ad=True, check_backward_ad=True)


def test_matches_layer_norm_then_modulate_with_func_jvp():
    """Values, torch.func.jvp tangents and gradients equal the unfused ops (float64: up to rounding)."""
    x, shift, scale = _inputs(torch.float64)
    tangents = tuple(torch.randn_like(t) for t in (x, shift, scale))
    unfused = lambda a, b, c: modulate(NORM(a), b, c)  # noqa: E731
    fused = lambda a, b, c: layer_norm_modulate(NORM, a, b, c)  # noqa: E731
    for got, ref in zip(torch.func.jvp(fused, (x, shift, scale), tangents),
                        torch.func.jvp(unfused, (x, shift, scale), tangents), strict=True):  # fmt: skip
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    x_only = torch.func.jvp(lambda a: fused(a, shift, scale), (x,), (tangents[0],))[1]  # absent (B, D) tangents
    torch.testing.assert_close(x_only, torch.func.jvp(lambda a: unfused(a, shift, scale), (x,), (tangents[0],))[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_dit_with_fused_adaln_stays_close(monkeypatch, dtype):
    """The DiT's forward, JVP tangent and gradients with RCM_FUSED_ADALN=eager against the unfused path: equal up
    to the dropped intermediate bf16 rounding (bf16), or float32 rounding."""
    torch.manual_seed(0)
    net = DiT(dit_debug())
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    net = net.to(dtype)
    for module in (net.time_embed, net.final.ada, *(b.ada for b in net.blocks)):  # time path in float32, as FSDP
        module.float()
    x, v, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.rand(2)
    cond = {"tokens": torch.randn(2, 5, 32), "mask": torch.ones(2, 5, dtype=torch.bool)}
    results = {}
    for mode in ("0", "eager"):
        monkeypatch.setenv("RCM_FUSED_ADALN", mode)
        net.zero_grad(set_to_none=True)
        with torch.no_grad():
            y, y_t = torch.func.jvp(lambda a, b: net(a, b, cond), (x, t), (v, torch.ones_like(t)))
        net(x, t, cond).float().square().sum().backward()
        results[mode] = (y, y_t, {n: p.grad.clone() for n, p in net.named_parameters()})
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5  # relative L2
    (y0, t0, g0), (y1, t1, g1) = results["0"], results["eager"]
    for name, a, b in [("y", y1, y0), ("y_t", t1, t0), *((n, g1[n], g0[n]) for n in g0)]:
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err <= tol, (name, err)


def test_bad_mode_and_affine_norm_are_refused(monkeypatch):
    x, shift, scale = _inputs(torch.float32)
    with pytest.raises(ValueError, match="affine-free"):
        layer_norm_modulate(nn.LayerNorm(16), x, shift, scale)
    monkeypatch.setenv("RCM_FUSED_ADALN", "yes")
    with pytest.raises(ValueError, match="RCM_FUSED_ADALN must be"):
        DiT(dit_debug())(torch.randn(1, 3, 8, 8), torch.rand(1))


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_compiled_rules_compose_with_func_jvp_and_checkpointing(monkeypatch, checkpointing):
    """RCM_FUSED_ADALN=compile (compiled here on the CPU, as on a GPU): torch.func.jvp through the DiT and a
    backward through (selectively checkpointed) blocks give the eager op's values (float32 rounding; the
    compiled kernels sum in another order). Without clearing functorch's interpreter stack, dynamo refuses."""
    from rcm_core.models import adaln
    from rcm_core.parallel.activation_checkpoint import apply_activation_checkpointing

    monkeypatch.setattr(adaln, "COMPILE_DEVICES", ("cuda", "cpu"))
    torch.manual_seed(0)
    net = DiT(dit_debug())
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    apply_activation_checkpointing(net, checkpointing)
    x, v, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.rand(2)
    cond = {"tokens": torch.randn(2, 5, 32), "mask": torch.ones(2, 5, dtype=torch.bool)}
    results = {}
    for mode in ("eager", "compile"):
        monkeypatch.setenv("RCM_FUSED_ADALN", mode)
        net.zero_grad(set_to_none=True)
        with torch.no_grad():
            y, y_t = torch.func.jvp(lambda a, b: net(a, b, cond), (x, t), (v, torch.ones_like(t)))
        net(x, t, cond).square().sum().backward()
        results[mode] = [y, y_t, *(p.grad for p in net.parameters())]
    for i, (got, ref) in enumerate(zip(results["compile"], results["eager"], strict=True)):
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()  # relative L2: float32 rounding
        assert err <= 1e-5, (i, err)
