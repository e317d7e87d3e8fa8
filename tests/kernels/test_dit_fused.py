"""The DiT with the fused attention kernel equals the math path: outputs, JVP tangents and gradients.

On CPU the kernel runs through Triton's interpreter (fp32); on a GPU it is compiled.
"""

import dataclasses

import torch

from rcm_core.models.dit import DiT, dit_debug

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair():
    torch.manual_seed(0)
    math_model = DiT(dataclasses.replace(dit_debug(), attention_backend="math"))
    with torch.no_grad():
        for p in math_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused_model = DiT(dataclasses.replace(dit_debug(), attention_backend="fused"))
    fused_model.load_state_dict(math_model.state_dict())
    return math_model.to(DEVICE), fused_model.to(DEVICE)


def _inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    v = torch.randn(2, 3, 8, 8, generator=gen)
    t = torch.rand(2, generator=gen, dtype=torch.float64)
    tokens = torch.randn(2, 7, 32, generator=gen)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])  # right-padded text
    cond = {"tokens": tokens.to(DEVICE), "mask": mask.to(DEVICE)}
    return x.to(DEVICE), v.to(DEVICE), t.to(DEVICE), cond


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_jvp_through_dit_with_fused_kernel_matches_math_path():
    math_model, fused_model = _pair()
    x, v, t, cond = _inputs()
    tt = torch.ones_like(t)
    f_m, df_m = torch.func.jvp(lambda xx, ti: math_model(xx, ti, cond), (x, t), (v, tt))
    f_f, df_f = torch.func.jvp(lambda xx, ti: fused_model(xx, ti, cond), (x, t), (v, tt))
    assert _rel(f_f, f_m) < 1e-4 and _rel(df_f, df_m) < 1e-4


def test_gradients_through_dit_with_fused_kernel_match_math_path():
    math_model, fused_model = _pair()
    x, _, t, cond = _inputs()
    math_model(x, t, cond).square().mean().backward()
    fused_model(x, t, cond).square().mean().backward()
    for (name, pm), pf in zip(math_model.named_parameters(), fused_model.parameters(), strict=True):
        if pm.grad is not None and pm.grad.norm() > 0:
            assert _rel(pf.grad, pm.grad) < 1e-3, name


def test_compiled_fused_adaln_on_gpu_matches_unfused(monkeypatch):
    """RCM_FUSED_ADALN=compile on CUDA (Inductor kernels for the adaLN rules) against the unfused path, float32:
    JVP output, tangent and gradients."""
    import pytest

    if DEVICE != "cuda":
        pytest.skip("torch.compile of the adaLN rules runs on CUDA only (the CPU test is tests/unit/test_adaln.py)")
    _, model = _pair()
    x, v, t, cond = _inputs()
    results = {}
    for mode in ("0", "compile"):
        monkeypatch.setenv("RCM_FUSED_ADALN", mode)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            f, df = torch.func.jvp(lambda xx, ti: model(xx, ti, cond), (x, t), (v, torch.ones_like(t)))
        model(x, t, cond).square().mean().backward()
        results[mode] = [f, df, *(p.grad for p in model.parameters() if p.grad is not None and p.grad.norm() > 0)]
    for got, ref in zip(results["compile"], results["0"], strict=True):
        assert _rel(got, ref) < 1e-4
