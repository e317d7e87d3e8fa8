"""Data parallelism for the DiT: batch sharding of the network's inputs, and FSDP2 weight sharding.

Batch sharding (`apply_batch_sharding`): the Distiller draws the global batch on every rank from one generator
(so N ranks see exactly the random numbers of one rank); the network keeps its rank's rows of x, time and the
condition, and all-gathers its output, like the token shards of context parallelism. The losses then run on
the full batch, identically on every rank.

FSDP2 (`apply_fsdp`): `fully_shard` per block and at the root, over all ranks. Because every rank computes the
same loss and its gradients are the contributions of its own rows and tokens (the gathers' backwards are
slices), the reduce-scatter must SUM, not average: gradient divide factor 1.

Mixed precision (GPU): blocks gather bf16 weights and compute in bf16; gradients reduce in fp32 into fp32
master weights. The time path (the time embedding and every adaLN modulation linear) gets FSDP units of its
own with fp32 weights: rCM's finite difference in t (step 1e-4) needs float32 (rCM, arXiv 2510.08431,
Sec. 4). Inputs are not cast by FSDP (the time must stay float32/float64); the DiT casts activations to its
weights' dtype itself. Selective checkpointing leaves those nested units outside its checkpointed stages
(activation_checkpoint.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from rcm_core.models.token_net import TokenNet
from rcm_core.parallel.collectives import all_gather, shard


def _shard_batch(x, group):
    if isinstance(x, torch.Tensor):
        return shard(x, 0, group)
    if isinstance(x, dict):
        return {k: _shard_batch(v, group) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_shard_batch(v, group) for v in x)
    return x  # None


def apply_batch_sharding(model: nn.Module, dp_group: dist.ProcessGroup) -> None:
    """model(x, time, cond) computes on this rank's rows of every input and returns the gathered output.

    Args:
        model: the network (its forward takes batched tensors, or dicts of them, and returns one tensor).
        dp_group: the ranks splitting the batch; the global batch must be divisible by its size.
    """
    world = dist.get_world_size(dp_group)

    def keep_rows(module, args, kwargs):
        batch = args[0].shape[0]
        if batch % world:
            raise ValueError(f"batch size {batch} is not divisible by dp_shard_degree ({world})")
        return _shard_batch(args, dp_group), _shard_batch(kwargs, dp_group)

    def gather_rows(module, args, kwargs, output):
        return all_gather(output, 0, dp_group)

    model.register_forward_pre_hook(keep_rows, with_kwargs=True)
    model.register_forward_hook(gather_rows, with_kwargs=True)


def apply_fsdp(
    model: TokenNet, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True
) -> None:
    """Shard a TokenNet (the DiT, a diffusers family) with FSDP2: the time path, each block, the output
    modules, then the root (whatever is left: patch embedding, text projection, ...).

    Args:
        mesh: 1-D mesh over every rank.
        param_dtype: dtype of the gathered block weights (the compute dtype), e.g. torch.bfloat16, with gradients
            reduced in float32 and the time path kept in float32; None computes in the weights' own dtype.
        reshard_after_forward: free each block's gathered weights after its forward (re-gathered in backward).
    """
    fp32 = torch.float32
    if mesh.size() == 1:
        # Nothing to free on one rank. NOTE: torch 2.11 (CUDA) fills a 1-rank unit's gathered weights with an
        # in-place copy, which torch.func.jvp rejects; a unit left gathered after its first forward skips that
        # copy in sCM's JVP, as the Distiller's critic rollout runs the student first. Backward still reshards,
        # so weights updated by an optimizer step (which always follows a backward) are gathered afresh.
        reshard_after_forward = False
    reduce_dtype = None if param_dtype is None else fp32
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    if param_dtype is not None:
        # Own units for the time path, so their weights are gathered (and used) in float32.
        time_mp = MixedPrecisionPolicy(param_dtype=fp32, reduce_dtype=fp32, cast_forward_inputs=False)
        for module in model.time_path_modules():
            fully_shard(module, mesh=mesh, mp_policy=time_mp, reshard_after_forward=reshard_after_forward)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The output layers run last in forward and first in backward: keeping them gathered saves an all-gather.
    for module in model.output_modules():
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    sum_gradients(model)


def sum_gradients(model: nn.Module) -> None:
    """Every FSDP unit in `model` reduce-scatters a plain sum of the ranks' gradients."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # every rank's loss is the whole loss, its gradient a partial sum: add, do not average
            module.set_gradient_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):  # a plain SUM: gloo has no PREMUL_SUM
                module.set_force_sum_reduction_for_comms(True)


def apply_fsdp_to_tree(
    model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True
) -> None:
    """FSDP2 for a network with DiTs anywhere inside (e.g. a text encoder + DiT): each DiT as `apply_fsdp` shards
    it (time path, blocks, final layer, its root), each other child of the root that holds weights (an encoder)
    as a unit of its own, then the root (whatever weights are left).

    Args: as for `apply_fsdp`.
    """
    if isinstance(model, TokenNet):
        apply_fsdp(model, mesh, param_dtype=param_dtype, reshard_after_forward=reshard_after_forward)
        return
    if mesh.size() == 1:
        reshard_after_forward = False  # as in apply_fsdp: nothing to free on one rank
    for dit in [m for m in model.modules() if isinstance(m, TokenNet)]:
        apply_fsdp(dit, mesh, param_dtype=param_dtype, reshard_after_forward=reshard_after_forward)
    reduce_dtype = None if param_dtype is None else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for child in model.children():
        holds_dit = any(isinstance(m, TokenNet) for m in child.modules())
        if not holds_dit and any(True for _ in child.parameters()):
            # an encoder: gathered once per forward, freed after it (its output does not depend on x or t)
            fully_shard(child, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    sum_gradients(model)
