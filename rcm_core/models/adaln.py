"""adaLN as one op: y = LayerNorm(x) * (1 + scale) + shift, with its forward-mode and reverse-mode rules written out.

The DiT's unfused path runs a bf16 LayerNorm, rounds its output to bf16, promotes it to float32 for the
modulation and rounds again (`modulate`); under torch.func.jvp PyTorch's generic rules add casts and
zero-filled tangents around each of those ops. Here the normalisation and the modulation are computed in
float32 from x in one function per direction (forward, jvp, backward), which `torch.compile` can turn into
one kernel each on a GPU; the intermediate bf16 rounding is gone, so values differ from the unfused path at
the bf16 rounding level (the tests bound it).

Math (xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps), means over the last dim D; s = scale, b = shift):
    y   = xhat * (1 + s) + b
    y_t = rstd * (x_t - mean(x_t) - xhat * mean(xhat * x_t)) * (1 + s) + xhat * s_t + b_t
    dx  = rstd * (g' - mean(g') - xhat * mean(g' * xhat)),  g' = g * (1 + s);  ds = sum_L g * xhat;  db = sum_L g
Selected by RCM_FUSED_ADALN: "0" (default: the unfused path), "eager" (this op, plain PyTorch) or "compile"
(this op with each direction compiled by torch.compile on CUDA; eager elsewhere).
Legend: B batch, L tokens, D width.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack


def _compute_dtype(x: torch.Tensor, scale: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)  # float32 (float64 in tests)


def _forward(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    x32 = x.to(_compute_dtype(x, scale))
    mean = x32.mean(-1, keepdim=True)  # (B, L, 1)
    centered = x32 - mean
    rstd = torch.rsqrt(centered.square().mean(-1, keepdim=True) + eps)  # (B, L, 1)
    y = (centered * rstd) * (1 + scale[:, None]) + shift[:, None]  # (B, L, D) float32
    return y.to(x.dtype), mean, rstd


def _tangent(x, mean, rstd, scale, x_t, shift_t, scale_t):
    xhat = (x.to(mean.dtype) - mean) * rstd
    x_t = x_t.to(mean.dtype)
    xhat_t = rstd * (x_t - x_t.mean(-1, keepdim=True) - xhat * (xhat * x_t).mean(-1, keepdim=True))
    y_t = xhat_t * (1 + scale[:, None]) + xhat * scale_t[:, None] + shift_t[:, None]
    return y_t.to(x.dtype)


def _backward(x, mean, rstd, scale, grad):
    xhat = (x.to(mean.dtype) - mean) * rstd
    g = grad.to(mean.dtype)
    g_mod = g * (1 + scale[:, None])
    grad_x = rstd * (g_mod - g_mod.mean(-1, keepdim=True) - xhat * (g_mod * xhat).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), g.sum(1), (g * xhat).sum(1)  # (B, L, D), (B, D), (B, D)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False, fullgraph=True)


COMPILE_DEVICES = ("cuda",)  # where "compile" compiles (tests add "cpu"; it needs a C++ compiler there)


def _run(fn, *args):
    if os.environ.get("RCM_FUSED_ADALN") == "compile" and args[0].device.type in COMPILE_DEVICES:
        # the rules run on plain tensors, but torch.func.jvp's interpreter stays on the stack while they run, and
        # dynamo refuses to trace under it: clear it for the compiled call (the attention kernel's launches
        # likewise run with functorch switched off)
        with temporarily_clear_interpreter_stack():
            return _compiled(fn)(*args)
    return fn(*args)


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """The plain tensor under a functorch wrapper of torch.func.jvp's level (saved tensors, tangents)."""
    while t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


class LayerNormModulate(torch.autograd.Function):
    """(x, shift, scale) -> (y, mean, rstd); only y is differentiable. See the module docstring."""

    @staticmethod
    def forward(x, shift, scale, eps):
        return _run(_forward, x, shift, scale, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shift, scale, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.save_for_forward(x, scale, mean, rstd)

    @staticmethod
    def jvp(ctx, x_t, shift_t, scale_t, _eps_t):
        x, scale, mean, rstd = (_plain(t) for t in ctx.saved_tensors)
        x_t, shift_t, scale_t = (_plain(t) for t in (x_t, shift_t, scale_t))
        # new tensors made here would be wrapped too: compute with functorch switched off (as the attention does)
        with torch._C._DisableFuncTorch():
            # absent tangents are zeros of the right shape ((B, D) ones are tiny; x_t is always there in sCM)
            x_t = torch.zeros_like(x) if x_t is None else x_t
            shift_t = torch.zeros_like(scale) if shift_t is None else shift_t
            scale_t = torch.zeros_like(scale) if scale_t is None else scale_t
            y_t = _run(_tangent, x, mean, rstd, scale, x_t, shift_t, scale_t)
        return y_t, None, None

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_rstd):
        if grad is None:
            return None, None, None, None
        x, scale, mean, rstd = ctx.saved_tensors
        grad_x, grad_shift, grad_scale = _run(_backward, x, mean, rstd, scale, grad)
        return grad_x, grad_shift.to(scale.dtype), grad_scale.to(scale.dtype), None


def fused_adaln_enabled() -> bool:
    mode = os.environ.get("RCM_FUSED_ADALN", "0")
    if mode not in ("0", "eager", "compile"):
        raise ValueError(f"RCM_FUSED_ADALN must be 0, eager or compile, got {mode!r}")
    return mode != "0"


def layer_norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift for an affine-free LayerNorm `norm` over the last dim, in x's dtype."""
    if norm.weight is not None or norm.bias is not None or len(norm.normalized_shape) != 1:
        raise ValueError("layer_norm_modulate takes an affine-free LayerNorm over the last dimension")
    y, _, _ = LayerNormModulate.apply(x, shift, scale, norm.eps)
    return y
