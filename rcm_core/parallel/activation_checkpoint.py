"""Activation checkpointing of the DiT blocks: none, full (recompute the whole block), or selective.

Selective (per-op, `torch.utils.checkpoint.create_selective_checkpoint_contexts`): the outputs of matmuls
and of PyTorch's attention ops are saved, everything else (norms, adaLN modulation, GELU, residual adds,
reshapes, the Ulysses all-to-alls) is recomputed in backward. That keeps the O(L D^2) and O(L^2 D) work out
of the recompute while dropping the many elementwise activations; recomputed all-to-alls re-run in the
same order on every rank, so they cannot deadlock.

Checkpointing applies only where a graph is built: forwards under no_grad (teacher, rollouts, and sCM's
torch.func.jvp of the student, which runs under no_grad) call the block directly, as nothing is saved there.

Known limits: the fused Triton attention is not a dispatcher op, so the selective policy cannot see it; on GPU
it is recomputed like the elementwise ops (the math and SDPA attention paths are saved). Selective needs
mixed precision off: under bf16 the fp32 adaLN linears are FSDP units nested in the block, whose hooks run
different ops in forward and in recompute, which per-op checkpointing rejects (full checkpointing works).
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

from rcm_core.models.dit import DiT

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


def apply_activation_checkpointing(model: DiT, policy: str) -> None:
    """Wrap each block's forward in a checkpoint (in place; module names and state dict keys are unchanged).

    Args:
        policy: "none", "full" or "selective".
    """
    if policy == "none":
        return
    if policy not in ("full", "selective"):
        raise ValueError(f"activation_checkpoint must be none, full or selective, got {policy!r}")
    context_fn = _selective_contexts if policy == "selective" else noop_context_fn
    for block in model.blocks:
        # NOTE: an instance attribute, not a wrapper module: FQNs (and so checkpoints) match the plain DiT.
        block.forward = functools.partial(_checkpointed_forward, block.forward, context_fn)
