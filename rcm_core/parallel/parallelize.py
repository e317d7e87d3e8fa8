"""Parallelize a network: batch and context parallel -> activation checkpointing -> FSDP2, applied to the DiT
blocks wherever they sit (a bare DiT, or a text encoder + DiT), encoders as FSDP units of their own.

`build_parallel_dit` is the torchtitan recipe (arXiv 2410.06511): build on the meta device (no memory),
parallelize, `to_empty` on the real device (each rank allocates only its shards), then initialise or load
a full state dict into the shards. Other trees are copied, then parallelized in place (`parallelize_net`).
`net_copier` turns either into the Distiller's `copy_net`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from rcm_core.models.dit import DiT, DiTConfig
from rcm_core.models.token_net import TokenNet
from rcm_core.parallel.activation_checkpoint import apply_activation_checkpointing
from rcm_core.parallel.context_parallel import apply_context_parallel
from rcm_core.parallel.fsdp import apply_batch_sharding, apply_fsdp, apply_fsdp_to_tree
from rcm_core.parallel.parallel_dims import ParallelConfig, ParallelDims

_PARAM_DTYPES = {"none": None, "bfloat16": torch.bfloat16}


def parallelize_dit(model: TokenNet, *, parallel_dims: ParallelDims, config: ParallelConfig) -> TokenNet:
    """Apply, in place and in this order, batch sharding and context parallelism, checkpointing, FSDP2.

    Args:
        model: a plain TokenNet, e.g. a DiT or a diffusers family's net (any device, `meta` included);
            parallel_dims must have built its mesh.
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


def dits_in(model: nn.Module) -> list[TokenNet]:
    """The TokenNets (DiTs, diffusers family nets) of a network tree (the model itself when it is one), outermost
    first."""
    return [m for m in model.modules() if isinstance(m, TokenNet)]


def check_parallelizable(model: nn.Module, config: ParallelConfig, cp_degree: int) -> None:
    """Raise ValueError, naming the setting, when `config` cannot apply to `model` (before any process starts).

    Context parallelism splits tokens inside DiT self-attention and checkpointing wraps DiT blocks: both need
    a DiT somewhere in the tree, and Ulysses needs its heads and tokens divisible by cp_degree.
    """
    dits = dits_in(model)
    if not dits:
        for name, value in {
            "cp_degree": cp_degree,
            "activation_checkpointing": config.activation_checkpointing,
        }.items():
            if value not in (1, "none"):
                raise ValueError(f"resources.{name}={value!r} needs a DiT in the network, got {type(model).__name__}")
    for dit in dits:
        if cp_degree > 1:
            dit.check_context_parallel(cp_degree)


def parallelize_net(model: nn.Module, *, parallel_dims: ParallelDims, config: ParallelConfig) -> nn.Module:
    """`parallelize_dit` for any network holding DiTs (e.g. TextToImageNet): the same steps in the same order.

    Batch sharding wraps the root (all inputs, the condition included, split by rows; the output gathered);
    context parallelism and checkpointing act on each DiT's blocks; FSDP2 shards each DiT per block, each
    encoder as one unit, then the root.
    """
    if isinstance(model, TokenNet):
        return parallelize_dit(model, parallel_dims=parallel_dims, config=config)
    check_parallelizable(model, config, parallel_dims.cp_degree)
    dits = dits_in(model)
    # 1. hooks first (see parallelize_dit); the DiT's own sequence hooks shard its tokens, after the encoder
    if parallel_dims.dp_enabled:
        apply_batch_sharding(model, parallel_dims.dp_group)
    for dit in dits:
        if parallel_dims.cp_enabled:
            apply_context_parallel(dit, parallel_dims.cp_group)
        # 2. checkpointing inside FSDP, per block
        apply_activation_checkpointing(dit, config.activation_checkpointing)
    # 3. FSDP last, on the final tree
    if parallel_dims.fsdp_enabled or config.mixed_precision != "none":
        apply_fsdp_to_tree(
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
) -> Callable[[nn.Module], nn.Module]:
    """The Distiller's `copy_net`: a parallel copy of the given network (teacher, student, fake, EMA).

    A bare DiT is built on `meta` and loaded (each rank allocates only its shards). Any other tree with
    TokenNets inside (a text encoder + DiT, a diffusers family's net) is cloned onto `meta` (structure only, no
    weight copied), parallelized, materialised on the device (this rank's shards only) and loaded from the
    source's full state dict; buffers are copied from the source. A 14B Wan student then never exists
    unsharded on the GPU (a plain deep copy would put 57 GB of float32 weights on every rank per copy).
    """

    def copy_net(net: nn.Module) -> nn.Module:
        if isinstance(net, DiT):
            return build_parallel_dit(
                net.cfg, parallel_dims=parallel_dims, config=config, device=device, state_dict=net.state_dict()
            )
        if not dits_in(net):
            raise TypeError(f"rcm_core.parallel parallelizes networks with DiT blocks, got {type(net).__name__}")
        model = parallelize_net(meta_clone(net), parallel_dims=parallel_dims, config=config)
        model.to_empty(device=device)
        set_model_state_dict(model, net.state_dict(), options=StateDictOptions(full_state_dict=True, strict=True))
        with torch.no_grad():
            for name, buf in net.named_buffers():  # incl. non-persistent ones, which no state dict holds
                model.get_buffer(name).copy_(buf)
        return model

    return copy_net


def meta_clone(net: nn.Module) -> nn.Module:
    """A deep copy of `net` whose parameters and buffers are empty tensors on `meta` (same dtypes, shapes and
    requires_grad); everything else (module classes, attributes, hooks installed as attributes) is copied."""
    memo: dict[int, object] = {}
    for p in net.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in net.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(net, memo)
