"""DiT shapes, adaLN-zero init, cross-attention masking, forward-mode AD, float32 time path."""

import pytest
import torch

from rcm_core.models.attention import attention_math
from rcm_core.models.dit import DiT, DiTConfig, dit_debug, dit_debug_uncond


def test_shapes_and_zero_output_at_init():
    model = DiT(dit_debug())
    x = torch.randn(3, 3, 8, 8)
    cond = {"tokens": torch.randn(3, 5, 32)}
    out = model(x, torch.rand(3, dtype=torch.float64), cond)
    assert out.shape == x.shape
    assert out.abs().max().item() == 0.0  # zero output layer: the untrained net predicts 0
    # adaLN-zero: every block starts as the identity
    for block in model.blocks:
        assert block.ada[-1].weight.abs().max().item() == 0.0


def test_unconditional_preset_and_bad_config():
    model = DiT(dit_debug_uncond())
    assert model(torch.randn(2, 3, 8, 8), torch.rand(2)).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        DiTConfig(image_size=9, patch_size=2)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        DiTConfig(dim=10, num_heads=3)


def test_key_padding_mask_ignores_padded_tokens():
    torch.manual_seed(0)
    model = DiT(dit_debug())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    tokens = torch.randn(2, 6, 32)
    mask = torch.tensor([[True] * 4 + [False] * 2] * 2)
    out = model(x, t, {"tokens": tokens, "mask": mask})
    changed = tokens.clone()
    changed[:, 4:] = 100.0  # padded positions must not matter
    out2 = model(x, t, {"tokens": changed, "mask": mask})
    torch.testing.assert_close(out, out2)
    assert not torch.allclose(out, model(x, t, {"tokens": tokens}))


def test_forward_mode_ad_through_the_dit_matches_finite_differences():
    torch.manual_seed(0)
    model = DiT(dit_debug()).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, v = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t = torch.rand(2, dtype=torch.float64)
    cond = {"tokens": torch.randn(2, 5, 32, dtype=torch.float64)}
    fn = lambda xx: model(xx, t, cond)  # noqa: E731
    _, jvp = torch.func.jvp(fn, (x,), (v,))
    h = 1e-6
    fd = (fn(x + h * v) - fn(x - h * v)) / (2 * h)
    torch.testing.assert_close(jvp, fd, atol=1e-6, rtol=1e-5)


def test_time_path_stays_float32_under_autocast():
    model = DiT(dit_debug())
    t = torch.rand(2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model.time_embed(t)
    assert emb.dtype == torch.float32
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, {"tokens": torch.randn(2, 5, 32)})
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_math_attention_matches_sdpa():
    q, k, v = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    torch.testing.assert_close(attention_math(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_modulate_equals_the_explicit_float32_formula(dtype):
    """modulate lets the multiply promote x instead of casting it first: same values, tangents and gradients."""
    from rcm_core.models.dit import modulate

    def explicit(x, shift, scale):  # the formula as first written: cast x, then compute in float32
        return (x.to(scale.dtype) * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)

    g = torch.Generator().manual_seed(0)
    x, x_t = (torch.randn(2, 5, 16, generator=g).to(dtype) for _ in range(2))
    shift, scale, shift_t, scale_t = (torch.randn(2, 16, generator=g) for _ in range(4))
    primals, tangents = (x, shift, scale), (x_t, shift_t, scale_t)
    pairs = zip(torch.func.jvp(modulate, primals, tangents), torch.func.jvp(explicit, primals, tangents), strict=True)
    for got, ref in pairs:
        assert got.dtype == ref.dtype == dtype and torch.equal(got, ref)
    grads = []
    for fn in (modulate, explicit):
        leaves = [p.clone().requires_grad_() for p in primals]
        fn(*leaves).float().square().sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
