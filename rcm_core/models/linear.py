"""nn.Linear whose forward-mode AD rule runs one matmul, not two, when the weight carries no tangent.

PyTorch's jvp rule for addmm/mm forms x_t W^T + x W_t^T and materialises an absent weight tangent W_t as zeros,
so `torch.func.jvp` of a network in its inputs (sCM's JVP, rcm_core.losses.scm) runs a full GEMM against a zero
matrix per linear: 3 GEMMs where primal + tangent need 2 (seen with FlopCounterMode and in profiles, torch 2.11
and 2.13). `linear` below is an autograd.Function with its own jvp (x_t W^T, plus x W_t^T + b_t only when
those tangents exist) and a backward that issues the same matmuls as autograd's addmm/mm backward, so
gradients are unchanged. Forward values are F.linear's.
Legend: N rows (all leading dims), I in features, O out features.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class LinearFunction(torch.autograd.Function):
    """y = x W^T + b, with forward-mode and reverse-mode rules written out (see the module docstring)."""

    @staticmethod
    def forward(x, weight, bias):
        # Autocast decides F.linear's dtype inside; the rules below replay that choice explicitly.
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.cast_dtype = _autocast_dtype(x)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        x, weight = ctx.saved_tensors
        dtype = ctx.cast_dtype
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            x_t, weight_t, bias_t = (None if t is None else t.to(dtype) for t in (x_t, weight_t, bias_t))
        out_t = None if x_t is None else F.linear(x_t, weight)  # (..., O): the one GEMM sCM needs
        if weight_t is not None:  # a tangent in the weights (e.g. a jvp in parameter space)
            term = F.linear(x, weight_t)
            out_t = term if out_t is None else out_t + term
        if bias_t is not None:
            out_t = bias_t.expand(*x.shape[:-1], -1) if out_t is None else out_t + bias_t
        if out_t is None:  # no tangent anywhere: a zero tangent of the output's shape
            out_t = torch.zeros((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
        return out_t

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        x, weight = ctx.saved_tensors
        x_dtype, w_dtype = x.dtype, weight.dtype
        if ctx.cast_dtype is not None:
            x, weight, grad = x.to(ctx.cast_dtype), weight.to(ctx.cast_dtype), grad.to(ctx.cast_dtype)
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (N, O)
        grad_x = grad_w = grad_b = None
        # the matmuls of autograd's addmm backward (mm_mat1_backward / mm_mat2_backward for a W^T view), so the
        # gradients match nn.Linear's bit for bit
        if ctx.needs_input_grad[0]:
            grad_x = grad_2d.mm(weight).view(x.shape).to(x_dtype)  # (..., I)
        if ctx.needs_input_grad[1]:
            grad_w = grad_2d.t().mm(x.reshape(-1, x.shape[-1])).to(w_dtype)  # (O, I)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0).to(w_dtype)  # (O,)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with a one-GEMM forward-mode rule when only x carries a tangent."""
    return LinearFunction.apply(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and init) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
