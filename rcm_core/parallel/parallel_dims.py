"""Parallel degrees and the device meshes built from them.

world_size = dp_shard_degree * cp_degree. The batch is split dp_shard_degree ways, each sample's tokens
cp_degree ways (Ulysses context parallelism), and FSDP2 shards the weights over all world_size ranks, so
context-parallel ranks hold only a shard of the weights as well (the flattened "dp_shard_cp" layout of
torchtitan, arXiv 2410.06511, Sec. 3.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(kw_only=True)
class ParallelConfig:
    # field names are the job spec's (service resources.*): one name per setting at every layer
    fsdp_degree: int = -1  # ranks splitting the batch (dp_shard); -1 = world_size / cp_degree
    cp_degree: int = 1  # ranks splitting each sample's tokens (Ulysses); must divide heads and tokens
    activation_checkpointing: Literal["none", "full", "selective"] = "none"  # per DiT block
    mixed_precision: Literal["none", "bfloat16"] = "none"  # bfloat16: bf16 blocks, fp32 time path and reductions
    reshard_after_forward: bool = True  # FSDP: free each block's gathered weights after its forward (ZeRO-3)

    def __post_init__(self) -> None:
        if self.cp_degree < 1 or (self.fsdp_degree < 1 and self.fsdp_degree != -1):
            raise ValueError(
                f"cp_degree must be >= 1 and fsdp_degree >= 1 or -1, got cp_degree={self.cp_degree}, "
                f"fsdp_degree={self.fsdp_degree}"
            )


@dataclass(kw_only=True)
class ParallelDims:
    """Resolved degrees; `build_mesh` then creates the process groups (after init_process_group)."""

    dp_shard_degree: int  # ranks splitting the batch
    cp_degree: int  # ranks splitting the tokens of each sample
    world_size: int  # processes in the job
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.dp_shard_degree < 1 or self.cp_degree < 1:
            raise ValueError(
                f"degrees must be >= 1: dp_shard_degree={self.dp_shard_degree}, cp_degree={self.cp_degree}"
            )
        if self.dp_shard_degree * self.cp_degree != self.world_size:
            raise ValueError(
                f"dp_shard_degree ({self.dp_shard_degree}) * cp_degree ({self.cp_degree}) = "
                f"{self.dp_shard_degree * self.cp_degree}, but world_size is {self.world_size}"
            )

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int) -> ParallelDims:
        """Fill in fsdp_degree = -1 as world_size / cp_degree."""
        dp = config.fsdp_degree
        if dp == -1:
            if world_size % config.cp_degree:
                raise ValueError(f"world_size ({world_size}) is not divisible by cp_degree ({config.cp_degree})")
            dp = world_size // config.cp_degree
        return cls(dp_shard_degree=dp, cp_degree=config.cp_degree, world_size=world_size)

    @property
    def dp_enabled(self) -> bool:
        return self.dp_shard_degree > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp_degree > 1

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP shards over every rank, data- and context-parallel alike."""
        return self.world_size > 1

    def build_mesh(self, device_type: str) -> None:
        """Create the (dp_shard, cp) mesh and the 1-D mesh FSDP shards over; needs an initialised process group."""
        if self.world_size != dist.get_world_size():
            raise ValueError(
                f"ParallelDims.world_size ({self.world_size}) != torch.distributed world size ({dist.get_world_size()})"
            )
        # NOTE: a second 1-D mesh instead of DeviceMesh._flatten (private, and it moved between torch versions);
        # on the whole world it reuses the default process group.
        self._meshes["fsdp"] = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp_shard_cp",))
        self._meshes["2d"] = init_device_mesh(
            device_type, (self.dp_shard_degree, self.cp_degree), mesh_dim_names=("dp_shard", "cp")
        )

    def _mesh(self, name: str) -> DeviceMesh:
        if name not in self._meshes:
            raise RuntimeError("call ParallelDims.build_mesh(device_type) after init_process_group first")
        return self._meshes[name]

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        return self._mesh("fsdp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self._mesh("2d").get_group("dp_shard")

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self._mesh("2d").get_group("cp")
