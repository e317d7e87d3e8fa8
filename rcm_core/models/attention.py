"""Attention dispatch for the DiT: the fused Triton forward+JVP kernel on CUDA, an explicit math path elsewhere.

The math path (softmax(s Q K^T) V written out) is forward-mode-AD friendly on any device, at O(N^2)
memory; PyTorch's fused SDPA backends have no forward-mode AD (see RUNBOOK).
Legend: B batch, H heads, Nq / Nk query / key length, D head dim.
"""

from __future__ import annotations

import math

import torch


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
    """(B, H, Nq, D), (B, H, Nk, D) x2 -> (B, H, Nq, D); key_padding_mask (B, Nk) is True for real keys."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Nq, Nk)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)  # fp32 softmax
    return probs.to(v.dtype) @ v


def _fused_available(q: torch.Tensor) -> bool:
    if not q.is_cuda:
        return False
    try:
        import rcm_core.kernels.attention_jvp  # noqa: F401
    except ImportError:
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask=None, *, backend: str = "auto"):
    """Non-causal attention; `backend` is "auto" (fused on CUDA), "math" or "fused".

    The fused kernel takes right-padded keys as per-sample lengths (`kv_seqlens`), which is what the
    tokenizer produces: key_padding_mask must then be a prefix of True values per row.
    """
    use_fused = backend == "fused" or (backend == "auto" and _fused_available(q))
    if use_fused:
        from rcm_core.kernels.attention_jvp import attention as fused_attention

        kv_seqlens = None if key_padding_mask is None else key_padding_mask.sum(-1).to(torch.int32)
        return fused_attention(q, k, v, kv_seqlens=kv_seqlens)
    return attention_math(q, k, v, key_padding_mask)
