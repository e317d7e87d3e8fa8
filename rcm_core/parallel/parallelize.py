"""Parallelize a DiT: batch and context parallel -> activation checkpointing -> FSDP2; build one on `meta`.

`build_parallel_dit` is the torchtitan recipe (arXiv 2410.06511): build on the meta device (no memory),
parallelize, `to_empty` on the real device (each rank allocates only its shards), then initialise or load
a full state dict into the shards. `net_copier` turns it into the Distiller's `copy_net`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from rcm_core.models.dit import DiT, DiTConfig
from rcm_core.parallel.activation_checkpoint import apply_activation_checkpointing
from rcm_core.parallel.context_parallel import apply_context_parallel
from rcm_core.parallel.fsdp import apply_batch_sharding, apply_fsdp
from rcm_core.parallel.parallel_dims import ParallelConfig, ParallelDims

_PARAM_DTYPES = {"none": None, "bfloat16": torch.bfloat16}


def parallelize_dit(model: DiT, *, parallel_dims: ParallelDims, config: ParallelConfig) -> DiT:
    """Apply, in place and in this order, batch sharding and context parallelism, checkpointing, FSDP2.

    Args:
        model: a plain DiT (any device, `meta` included); parallel_dims must have built its mesh.
        config: activation checkpointing policy, mixed precision, resharding.
    Returns:
        The same module; an FSDPModule when more than one rank takes part or mixed precision is on.
    """
    # 1. Batch and context parallelism first: they install the hooks (input shards, output gathers, Ulysses
    #    attention inside each block) that checkpointing must replay on recompute and FSDP must wrap.
    if parallel_dims.dp_enabled:
        apply_batch_sharding(model, parallel_dims.dp_group)
    if parallel_dims.cp_enabled:
        apply_context_parallel(model, parallel_dims.cp_group)
    # 2. Checkpointing inside FSDP: the block's forward is checkpointed, FSDP's all-gather hooks sit outside
    #    it, so recompute in backward runs on weights FSDP has already re-gathered for that block.
    apply_activation_checkpointing(model, config.activation_checkpointing)
    # 3. FSDP last, on the final module tree: one unit per block (the granularity of gathers and frees).
    #    It also carries mixed precision, so one rank with bf16 goes through it too (sharding nothing).
    if parallel_dims.fsdp_enabled or config.mixed_precision != "none":
        apply_fsdp(
            model,
            parallel_dims.fsdp_mesh,
            param_dtype=_PARAM_DTYPES[config.mixed_precision],
            reshard_after_forward=config.reshard_after_forward,
        )
    return model


def build_parallel_dit(
    cfg: DiTConfig,
    *,
    parallel_dims: ParallelDims,
    config: ParallelConfig,
    device: torch.device | str,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> DiT:
    """A parallelized DiT with weights: built on `meta`, parallelized, materialised on `device`.

    Args:
        state_dict: full (unsharded) weights every rank holds, e.g. the teacher's; None = `init_weights()`.
    """
    with torch.device("meta"):
        model = DiT(cfg)
    parallelize_dit(model, parallel_dims=parallel_dims, config=config)
    model.to_empty(device=device)
    model.init_weights()  # also the buffers, which a meta model lacks and no state dict holds
    if state_dict is not None:
        set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))
    return model


def net_copier(
    *, parallel_dims: ParallelDims, config: ParallelConfig, device: torch.device | str
) -> Callable[[nn.Module], DiT]:
    """The Distiller's `copy_net`: a parallel DiT holding the given DiT's weights (teacher, student, fake, EMA)."""

    def copy_net(net: nn.Module) -> DiT:
        if not isinstance(net, DiT):
            raise TypeError(f"rcm_core.parallel parallelizes DiT networks, got {type(net).__name__}")
        return build_parallel_dit(
            net.cfg, parallel_dims=parallel_dims, config=config, device=device, state_dict=net.state_dict()
        )

    return copy_net
