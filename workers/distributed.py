"""Rank-aware pieces of a Ray Train worker: the process group, the parallel degrees, the sharded networks.

Ray Train's `TorchTrainer` starts torch.distributed on every worker before `train_loop_per_worker` runs (gloo on
CPU workers, NCCL with `use_gpu`), one rank per worker. With one worker the Distiller is the plain single-process
one. With N workers every network is data parallel over all ranks the rcm_core.parallel way (arXiv 2410.06511):
each rank draws the same global batch from the same generator, the network keeps its rank's rows (and, with
context parallelism, its tokens) and all-gathers its output, FSDP2 shards the weights over every rank and SUMS
the per-rank gradients, so losses and metrics are the same on every rank and one copy of the truth exists.

- A network with DiT blocks (a bare DiT, or the shapes task's text encoder + DiT) goes through
  `rcm_core.parallel.parallelize.net_copier`: batch sharding, Ulysses context parallelism, activation
  checkpointing and FSDP2 per DiT block, encoders as FSDP units of their own.
- Any other network (the 2-D MLP teacher) gets batch sharding and one FSDP2 unit at its root. It is small, so
  per-block units would only add collectives; context parallelism splits tokens inside attention, so it needs
  DiT blocks (refused here, and by the service's schema for the 2-D datasets).
NOTE: replicating the network instead (every rank computing the identical step) was rejected: N copies of the
same work, and ranks that stay in step only while every kernel is bitwise deterministic.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from rcm_core.config import ConfigError
from rcm_core.parallel.fsdp import apply_batch_sharding
from rcm_core.parallel.parallel_dims import ParallelConfig, ParallelDims
from rcm_core.parallel.parallelize import check_parallelizable, dits_in, net_copier


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def training_device(use_gpu: bool) -> torch.device:
    """The device Ray Train gave this worker (its GPU with use_gpu), else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


def build_parallel_dims(config: ParallelConfig, device: torch.device) -> ParallelDims | None:
    """The degrees and meshes over Ray Train's process group; None with a single worker and nothing to apply.

    Raises:
        ConfigError: the degrees do not multiply to the number of workers.
    """
    if world_size() == 1 and config.activation_checkpointing == "none":
        return None
    try:
        dims = ParallelDims.from_config(config, world_size())
    except ValueError as exc:
        raise ConfigError(f"resources: {exc}") from None
    dims.build_mesh(device.type)
    return dims


def net_copy_fn(
    net: nn.Module, *, dims: ParallelDims | None, config: ParallelConfig, device: torch.device
) -> Callable[[nn.Module], nn.Module] | None:
    """The Distiller's `copy_net` for the teacher network `net`; None for the single-process Distiller.

    Raises:
        ConfigError: context parallelism or activation checkpointing asked for a network that is not a DiT.
    """
    if dims is None:
        return None
    try:  # both work inside DiT blocks (attention over tokens, per-block recompute), wherever they sit
        check_parallelizable(net, config, dims.cp_degree)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if dits_in(net):
        return net_copier(parallel_dims=dims, config=config, device=device)
    if dims.world_size == 1:
        return None

    def copy_data_parallel(source: nn.Module) -> nn.Module:
        replica = copy.deepcopy(source).to(device)
        apply_batch_sharding(replica, dims.dp_group)
        fully_shard(replica, mesh=dims.fsdp_mesh)
        # every rank's loss is the whole loss and its gradient the contribution of its own rows: add, not average
        replica.set_gradient_divide_factor(1.0)
        if hasattr(replica, "set_force_sum_reduction_for_comms"):  # a plain SUM: gloo has no PREMUL_SUM
            replica.set_force_sum_reduction_for_comms(True)
        return replica

    return copy_data_parallel


def full_copy(module: nn.Module, template: nn.Module) -> nn.Module | None:
    """An unsharded copy of `module` (built from `template`, loaded with its weights) on rank 0, None elsewhere.

    A collective: every rank must call it. With one worker the module is returned as it is.
    """
    if world_size() == 1:
        return module
    state: dict[str, Any] = get_model_state_dict(
        module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )  # only rank 0 receives the gathered tensors
    if rank() != 0:
        return None
    plain = copy.deepcopy(template).cpu()
    plain.load_state_dict(state)
    return plain.eval()


def rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank, so that all ranks take the same branch (e.g. stop on a cancel request)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())
