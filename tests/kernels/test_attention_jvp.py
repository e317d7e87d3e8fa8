"""Tests for rcm_core/kernels/attention_jvp.py against its float64 PyTorch oracle.

Pass rule (STYLE.md, Tests): relative L2 error of the kernel vs the float64 reference <= 2x the error of the same
computation in plain PyTorch at the inputs' precision, plus a small atol. Outputs are poisoned with NaN before
each launch, so an element a kernel never writes fails (fixture in conftest.py). Without CUDA the kernels run in
Triton's interpreter (conftest.py) on small shapes in fp32/fp16; bf16 and large shapes run only where a GPU is present.
"""

import importlib
import math

import pytest
import torch

from rcm_core.kernels import (
    attention,
    attention_backward,
    attention_forward,
    attention_jvp,
    attention_jvp_forward,
    attention_jvp_ref,
    attention_tangent_forward,
)

# the package re-exports the function `attention_jvp`, which shadows the submodule attribute of the same name
kernel_module = importlib.import_module("rcm_core.kernels.attention_jvp")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
skip_without_gpu = pytest.mark.skipif(
    not HAS_CUDA, reason="needs CUDA: bf16 tl.dot is wrong in Triton's CPU interpreter, large shapes too slow there"
)

# (B, H, Nq, Nk): odd lengths and cross-attention both ways, several full 32-key blocks plus a masked tail,
# and exact multiples of the block sizes
CPU_SHAPES = [(1, 2, 77, 45), (2, 1, 33, 100), (1, 1, 64, 64)]
GPU_SHAPES = [(2, 3, 1000, 1000), (1, 4, 2048, 77), (1, 2, 129, 4096)]
SHAPES = CPU_SHAPES + (GPU_SHAPES if HAS_CUDA else [])
HEAD_DIMS = [32, 64] + ([128, 256] if HAS_CUDA else [])
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# added to 2x the same-precision PyTorch error; relative units
ATOL = {torch.float32: 5e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def make_inputs(gen, B, H, Nq, Nk, D, dtype):
    q, q_t = randn(gen, B, H, Nq, D, dtype=dtype), randn(gen, B, H, Nq, D, dtype=dtype)
    k, k_t = randn(gen, B, H, Nk, D, dtype=dtype), randn(gen, B, H, Nk, D, dtype=dtype)
    v, v_t = randn(gen, B, H, Nk, D, dtype=dtype), randn(gen, B, H, Nk, D, dtype=dtype)
    return q, k, v, q_t, k_t, v_t


def rel_l2(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check(name, out, same_precision, oracle):
    """Kernel output vs float64 oracle, judged against the same-precision PyTorch error."""
    assert torch.isfinite(out).all(), f"{name}: non-finite elements (unwritten output?)"
    err, base = rel_l2(out, oracle), rel_l2(same_precision, oracle)
    tol = 2 * base + ATOL[out.dtype]
    assert err <= tol, f"{name}: rel L2 err {err:.3e} > {tol:.3e} (PyTorch {out.dtype} err {base:.3e})"


def case_ids(shape):
    return "x".join(map(str, shape))


# -- forward and JVP ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("shape", SHAPES, ids=case_ids)
def test_fused_forward_jvp_matches_reference(gen, shape, D, dtype):
    inputs = make_inputs(gen, *shape, D, dtype)
    o, o_t, lse = attention_jvp_forward(*inputs)
    ref_o, ref_o_t = attention_jvp_ref(*inputs)
    same_o, same_o_t = attention_jvp_ref(*inputs, upcast=False)
    check("o", o, same_o, ref_o)
    check("o_t", o_t, same_o_t, ref_o_t)
    q, k = inputs[0].double(), inputs[1].double()
    ref_lse = torch.logsumexp(D**-0.5 * q @ k.transpose(-1, -2), dim=-1)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("growth", ["rising", "falling"])
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_fused_rescale_when_row_max_moves(gen, lazy, growth, dtype):
    """Key norms ramp along the sequence: rising moves the running row max by far more than the fused kernel's
    lazy-rescale threshold (2^8), so the lazy rescale branch runs on later blocks; falling puts the largest keys
    first. Both rescale variants of the fused kernel, pinned to 32x32 tiles (several key blocks)."""
    B, H, Nq, Nk, D = 1, 2, 40, 300, 32
    q, k, v, q_t, k_t, v_t = make_inputs(gen, B, H, Nq, Nk, D, dtype)
    ramp = torch.linspace(0.1, 5.0, Nk, device=DEVICE)
    ramp = ramp if growth == "rising" else ramp.flip(0)
    k = (k.float() * ramp[:, None]).to(dtype)
    scores = D**-0.5 * q.double() @ k.double().transpose(-1, -2) / math.log(2)  # log2 units, as in the kernel
    if growth == "rising":  # the row max over all keys exceeds the first 32 keys' by much more than 2^8
        rise = (scores.amax(-1) - scores[..., :32].amax(-1)).max().item()
        assert rise > 2 * kernel_module.RESCALE_THRESHOLD.value, f"row max rises by only {rise:.1f} (log2 units)"
    config = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, LAZY_RESCALE=lazy)
    fused = kernel_module.MODE_FUSED
    o, o_t, lse = kernel_module._launch_fwd(fused, q, k, v, q_t, k_t, v_t, None, D**-0.5, None, config=config)
    ref_o, ref_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t)
    same_o, same_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t, upcast=False)
    check("o", o, same_o, ref_o)
    check("o_t", o_t, same_o_t, ref_o_t)
    ref_lse = torch.logsumexp(D**-0.5 * q.double() @ k.double().transpose(-1, -2), dim=-1)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("shape", SHAPES, ids=case_ids)
def test_primal_and_tangent_kernels_match_reference(gen, shape, D, dtype):
    q, k, v, q_t, k_t, v_t = make_inputs(gen, *shape, D, dtype)
    o, lse = attention_forward(q, k, v)
    o_t = attention_tangent_forward(q, k, v, o, lse, q_t, k_t, v_t)
    ref_o, ref_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t)
    same_o, same_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t, upcast=False)
    check("o", o, same_o, ref_o)
    check("o_t", o_t, same_o_t, ref_o_t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("present", ["q", "k", "v", "qk", "kv", "qv"])
def test_missing_tangents_are_zero(gen, present, dtype):
    """None tangents (e.g. constant text K/V in cross-attention) skip their GEMMs and act as zeros."""
    q, k, v, q_t, k_t, v_t = make_inputs(gen, 1, 2, 45, 70, 32, dtype)
    tangents = [t if name in present else None for name, t in zip("qkv", (q_t, k_t, v_t), strict=True)]
    ref_o, ref_o_t = attention_jvp_ref(q, k, v, *tangents)
    same_o, same_o_t = attention_jvp_ref(q, k, v, *tangents, upcast=False)
    o, o_t, lse = attention_jvp_forward(q, k, v, *tangents)
    check("o", o, same_o, ref_o)
    check("o_t fused", o_t, same_o_t, ref_o_t)
    check("o_t tangent-only", attention_tangent_forward(q, k, v, o, lse, *tangents), same_o_t, ref_o_t)


def test_explicit_scale(gen):
    q, k, v, q_t, k_t, v_t = make_inputs(gen, 1, 2, 50, 40, 64, torch.float32)
    o, o_t = attention_jvp(q, k, v, q_t, k_t, v_t, scale=0.3)
    ref_o, ref_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t, scale=0.3)
    same_o, same_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t, scale=0.3, upcast=False)
    check("o", o, same_o, ref_o)
    check("o_t", o_t, same_o_t, ref_o_t)


def test_reference_matches_autodiff(gen):
    """The closed-form oracle equals torch.func.jvp through softmax attention (float64, with padding)."""
    q, k, v, q_t, k_t, v_t = (x.double() for x in make_inputs(gen, 2, 2, 20, 30, 32, torch.float32))
    kv_seqlens = torch.tensor([30, 11], device=DEVICE)
    keep = (torch.arange(30, device=DEVICE)[None, :] < kv_seqlens[:, None])[:, None, None, :]

    def math_attention(q, k, v):
        s = (q @ k.transpose(-1, -2)) * 32**-0.5
        return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v

    o, o_t = torch.func.jvp(math_attention, (q, k, v), (q_t, k_t, v_t))
    ref_o, ref_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t, kv_seqlens=kv_seqlens)
    torch.testing.assert_close(ref_o, o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref_o_t, o_t, rtol=1e-12, atol=1e-12)


# -- backward -------------------------------------------------------------------------------------------------------


def reference_grads(q, k, v, do, upcast, kv_seqlens=None):
    dtype = torch.float64 if upcast else q.dtype
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    o, _ = attention_jvp_ref(*leaves, kv_seqlens=kv_seqlens, upcast=upcast)
    return torch.autograd.grad(o, leaves, do.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("shape", SHAPES, ids=case_ids)
def test_backward_matches_reference(gen, shape, D, dtype):
    q, k, v, _, _, _ = make_inputs(gen, *shape, D, dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o = attention(q, k, v)
    do = randn(gen, *o.shape, dtype=dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)
    oracle = reference_grads(q, k, v, do, upcast=True)
    same = reference_grads(q, k, v, do, upcast=False)
    for name, g, s, r in zip(("dq", "dk", "dv"), grads, same, oracle, strict=True):
        check(name, g, s, r)


def test_attention_jvp_is_differentiable_through_o(gen):
    q, k, v, q_t, k_t, v_t = make_inputs(gen, 1, 2, 40, 70, 32, torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, o_t = attention_jvp(q, k, v, q_t, k_t, v_t)
    assert o.requires_grad and not o_t.requires_grad
    do = randn(gen, *o.shape, dtype=torch.float32)
    grads = torch.autograd.grad(o, (q, k, v), do)
    oracle = reference_grads(q, k, v, do, upcast=True)
    same = reference_grads(q, k, v, do, upcast=False)
    for name, g, s, r in zip(("dq", "dk", "dv"), grads, same, oracle, strict=True):
        check(name, g, s, r)


# -- forward-mode AD through the autograd op ------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "RCM_ATTN_FUSED_JVP=0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_func_jvp_runs_fused_or_tangent_kernel(gen, monkeypatch, dtype, fused):
    """torch.func.jvp through a function calling `attention`: one fused forward+JVP launch on the tangents read
    off the dual inputs; with RCM_ATTN_FUSED_JVP=0 the primal kernel, then the LSE-reusing tangent kernel."""
    if not fused:
        monkeypatch.setenv("RCM_ATTN_FUSED_JVP", "0")
    modes = []
    launch = kernel_module._launch_fwd

    def spy(mode, *args, **kwargs):
        modes.append(mode)
        return launch(mode, *args, **kwargs)

    monkeypatch.setattr(kernel_module, "_launch_fwd", spy)
    q, k, v, q_t, k_t, v_t = make_inputs(gen, 2, 2, 45, 33, 32, dtype)
    proj = randn(gen, 32, 32, dtype=dtype)

    def layer(q, k, v):  # attention inside a tiny "model"
        return attention(q @ proj, k, v) @ proj

    with torch.no_grad():
        out, out_t = torch.func.jvp(layer, (q, k, v), (q_t, k_t, v_t))
    assert modes == ([kernel_module.MODE_FUSED] if fused else [kernel_module.MODE_PRIMAL, kernel_module.MODE_TANGENT])
    ref_o, ref_o_t = attention_jvp_ref(q @ proj, k, v, q_t @ proj, k_t, v_t)
    same_o, same_o_t = attention_jvp_ref(q @ proj, k, v, q_t @ proj, k_t, v_t, upcast=False)
    check("out", out, same_o @ proj, ref_o @ proj.double())
    check("out_t", out_t, same_o_t @ proj, ref_o_t @ proj.double())


def test_func_jvp_keeps_primal_differentiable(gen):
    """Student-style use: jvp over a with-grad forward; the primal back-propagates, the tangent is detached."""
    q, k, v, q_t, _, _ = make_inputs(gen, 1, 2, 40, 50, 32, torch.float32)
    q.requires_grad_()
    o, o_t = torch.func.jvp(lambda x: attention(x, k, v), (q,), (q_t,))
    assert o.requires_grad and not o_t.requires_grad
    (dq,) = torch.autograd.grad(o, (q,), torch.ones_like(o))
    (ref_dq,) = torch.autograd.grad(attention_jvp_ref(q, k, v)[0], (q,), torch.ones_like(o, dtype=torch.float64))
    check("dq", dq, ref_dq.float(), ref_dq)
    ref_o_t = attention_jvp_ref(q.detach(), k, v, q_t)[1]
    check("o_t", o_t, ref_o_t.float(), ref_o_t)


def test_forward_ad_dual_tensors(gen):
    import torch.autograd.forward_ad as fwAD

    q, k, v, q_t, k_t, _ = make_inputs(gen, 1, 2, 30, 40, 32, torch.float32)
    with fwAD.dual_level():
        o_t = fwAD.unpack_dual(attention(fwAD.make_dual(q, q_t), fwAD.make_dual(k, k_t), v)).tangent
    ref_o_t = attention_jvp_ref(q, k, v, q_t, k_t)[1]
    check("o_t", o_t, attention_jvp_ref(q, k, v, q_t, k_t, upcast=False)[1], ref_o_t)


def test_nested_transform_is_refused(gen):
    q, k, v, q_t, _, _ = make_inputs(gen, 1, 1, 16, 16, 32, torch.float32)

    def tangent_sum(x):
        return torch.func.jvp(lambda y: attention(y, k, v), (x,), (q_t,))[1].sum()

    with pytest.raises(NotImplementedError, match="does not compose"):
        torch.func.grad(tangent_sum)(q)


# -- key padding, layouts, errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_kv_seqlens_padding(gen, dtype):
    """Right-padded keys: lengths off the block grid, one full, one empty (O = O_t = grads = 0)."""
    q, k, v, q_t, k_t, v_t = make_inputs(gen, 4, 2, 37, 70, 32, dtype)
    kv_seqlens = torch.tensor([70, 33, 5, 0], device=DEVICE, dtype=torch.int32)
    ref_o, ref_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t, kv_seqlens=kv_seqlens)
    same_o, same_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t, kv_seqlens=kv_seqlens, upcast=False)
    o, o_t = attention_jvp(q, k, v, q_t, k_t, v_t, kv_seqlens=kv_seqlens)
    check("o", o, same_o, ref_o)
    check("o_t", o_t, same_o_t, ref_o_t)
    assert (o[3] == 0).all() and (o_t[3] == 0).all()

    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o_t = torch.func.jvp(lambda a, b, c: attention(a, b, c, kv_seqlens=kv_seqlens), (q, k, v), (q_t, k_t, v_t))[1]
    check("o_t via func.jvp", o_t, same_o_t, ref_o_t)
    o = attention(q, k, v, kv_seqlens=kv_seqlens)
    do = randn(gen, *o.shape, dtype=dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)
    oracle = reference_grads(q, k, v, do, upcast=True, kv_seqlens=kv_seqlens)
    same = reference_grads(q, k, v, do, upcast=False, kv_seqlens=kv_seqlens)
    for name, g, s, r in zip(("dq", "dk", "dv"), grads, same, oracle, strict=True):
        check(name, g, s, r)
    assert (grads[1][1, :, 33:] == 0).all() and (grads[2][1, :, 33:] == 0).all()


def test_strided_layouts(gen):
    """(B, N, H, D) storage viewed as (B, H, N, D), as a fused QKV projection produces; tangents contiguous."""
    B, H, Nq, Nk, D = 2, 2, 45, 60, 32
    q = randn(gen, B, Nq, H, D, dtype=torch.float32).transpose(1, 2)
    kv = randn(gen, B, Nk, 2, H, D, dtype=torch.float32)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    q_t, k_t, v_t = (randn(gen, *x.shape, dtype=torch.float32) for x in (q, k, v))
    o, o_t = attention_jvp(q, k, v, q_t, k_t, v_t)
    ref_o, ref_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t)
    same_o, same_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t, upcast=False)
    check("o", o, same_o, ref_o)
    check("o_t", o_t, same_o_t, ref_o_t)
    do = randn(gen, B, Nq, H, D, dtype=torch.float32).transpose(1, 2)
    grads = attention_backward(do, q, k, v, o, attention_forward(q, k, v)[1])
    oracle = reference_grads(q, k, v, do, upcast=True)
    same = reference_grads(q, k, v, do, upcast=False)
    for name, g, s, r in zip(("dq", "dk", "dv"), grads, same, oracle, strict=True):
        check(name, g, s, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_unaligned_inputs_take_pointer_path(gen, dtype):
    """K/V-side tensors whose base is not 16-byte aligned cannot use TMA: the kernels fall back to masked loads."""
    B, H, Nq, Nk, D = 1, 2, 45, 70, 32
    q, k, v, q_t, k_t, v_t = make_inputs(gen, B, H, Nq, Nk, D, dtype)
    k = torch.cat([k.new_zeros(1), k.flatten()])[1:].view(B, H, Nk, D)  # same values, base offset by one element
    assert not kernel_module._tma_ok(k)
    ref_o, ref_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t)
    same_o, same_o_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t, upcast=False)
    o, o_t, lse = attention_jvp_forward(q, k, v, q_t, k_t, v_t)
    check("o", o, same_o, ref_o)
    check("o_t", o_t, same_o_t, ref_o_t)
    check("o_t tangent-only", attention_tangent_forward(q, k, v, o, lse, q_t, k_t, v_t), same_o_t, ref_o_t)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(D=48), "head dim 48 is not supported"),
        (dict(dtype=torch.float64), "dtype torch.float64 is not supported"),
        (dict(Nk_v=7), "must have k's shape"),
        (dict(tangent_dtype=torch.float16), "q_t dtype torch.float16 must match"),
        (dict(kv_seqlens=torch.tensor([3, 4])), "kv_seqlens must have shape"),
        (dict(dims=3), "must be \\(B, H, N, D\\)"),
    ],
    ids=["head_dim", "dtype", "v_shape", "tangent_dtype", "kv_seqlens", "rank"],
)
def test_unsupported_inputs_raise(gen, change, message):
    D, dtype = change.get("D", 32), change.get("dtype", torch.float32)
    q, k, v, q_t, k_t, v_t = make_inputs(gen, 1, 2, 16, 16, D, dtype)
    if "Nk_v" in change:
        v = v[:, :, : change["Nk_v"]]
    if "tangent_dtype" in change:
        q_t = q_t.to(change["tangent_dtype"])
    if "dims" in change:
        q = q[0]
    with pytest.raises(ValueError, match=message):
        attention_jvp(q, k, v, q_t, k_t, v_t, kv_seqlens=change.get("kv_seqlens"))


# -- GPU only -------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@skip_without_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 4096, 4096, 128), (2, 8, 1024, 1024, 64), (1, 2, 8190, 512, 128)])
def test_large_shapes(gen, shape, dtype):
    inputs = make_inputs(gen, *shape, dtype)
    o, o_t = attention_jvp(*inputs)
    ref_o, ref_o_t = attention_jvp_ref(*inputs)
    same_o, same_o_t = attention_jvp_ref(*inputs, upcast=False)
    check("o", o, same_o, ref_o)
    check("o_t", o_t, same_o_t, ref_o_t)
