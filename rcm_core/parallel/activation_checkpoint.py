"""Activation checkpointing of the DiT blocks: none, full (recompute the whole block), or selective.

Full: each block's forward is checkpointed; backward recomputes all of it, self-attention included.

Selective: the self-attention is not checkpointed at all (the fused kernel keeps q, k, v, o and the LSE for
its backward, so it is never recomputed), and the two token-wise stages around it, `DiTBlock.attention_inputs`
(norm, modulation, q/k/v projections, q/k RMSNorm) and `DiTBlock.attention_output_and_mlp` (output
projection, gated residual, cross-attention, norm, modulation, MLP), are checkpointed per op
(`torch.utils.checkpoint.create_selective_checkpoint_contexts`): matmul outputs (and PyTorch's attention ops, on
the math/SDPA paths) are saved, everything else (norms, adaLN modulation, GELU, residual adds, casts) is
recomputed in backward. The adaLN linears, which are FSDP units of their own under bf16 mixed precision
(fsdp.py), run outside both stages, so the recompute replays exactly the forward's ops (per-op
checkpointing rejects anything else). Under Ulysses context parallelism the all-to-alls sit in the
self-attention, outside the checkpointed stages, and are not re-run either.

Checkpointing applies only where a graph is built: forwards under no_grad (teacher, rollouts, and sCM's
torch.func.jvp of the student, which runs under no_grad) call the block directly, as nothing is saved there.
The cross-attention (64 condition tokens) runs inside the second stage; its fused kernel is not a dispatcher
op, so it is recomputed with the elementwise work (cheap: its cost is linear in the image tokens).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from rcm_core.models.token_net import TokenNet

aten = torch.ops.aten
_SAVED_OPS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}


def _save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_save_matmuls_and_attention)


def _checkpointed_forward(forward, context_fn, *args, **kwargs):
    if not torch.is_grad_enabled():  # nothing is saved without a graph: skip the checkpoint machinery
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def apply_activation_checkpointing(model: TokenNet, policy: str) -> None:
    """Wrap each block's forward in a checkpoint (in place; module names and state dict keys are unchanged).

    Args:
        policy: "none", "full" or "selective".
    """
    if policy == "none":
        return
    if policy not in ("full", "selective"):
        raise ValueError(f"activation_checkpoint must be none, full or selective, got {policy!r}")
    for block in model.blocks:
        # NOTE: instance attributes, not wrapper modules: FQNs (and so checkpoints) match the plain DiT.
        if policy == "full":
            block.forward = functools.partial(_checkpointed_forward, block.forward, noop_context_fn)
        else:
            for stage in model.checkpoint_stages:
                forward = functools.partial(_checkpointed_forward, getattr(block, stage), _selective_contexts)
                setattr(block, stage, forward)
