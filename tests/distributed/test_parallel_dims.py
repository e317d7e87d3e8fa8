"""ParallelDims and the context-parallel divisibility checks: plain validation, no process group needed."""

import pytest

from rcm_core.models.dit import DiT, DiTConfig, dit_debug
from rcm_core.parallel.activation_checkpoint import apply_activation_checkpointing
from rcm_core.parallel.parallel_dims import ParallelConfig, ParallelDims


def test_degrees_must_multiply_to_the_world_size():
    dims = ParallelDims(dp_shard_degree=2, cp_degree=4, world_size=8)
    assert dims.dp_enabled and dims.cp_enabled and dims.fsdp_enabled
    assert not ParallelDims(dp_shard_degree=1, cp_degree=1, world_size=1).fsdp_enabled
    with pytest.raises(ValueError, match=r"dp_shard_degree \(2\) \* cp_degree \(2\) = 4, but world_size is 8"):
        ParallelDims(dp_shard_degree=2, cp_degree=2, world_size=8)
    with pytest.raises(ValueError, match="degrees must be >= 1"):
        ParallelDims(dp_shard_degree=0, cp_degree=2, world_size=0)


def test_dp_shard_degree_fills_the_rest():
    dims = ParallelDims.from_config(ParallelConfig(cp_degree=2), world_size=8)
    assert (dims.dp_shard_degree, dims.cp_degree) == (4, 2)
    with pytest.raises(ValueError, match=r"world_size \(6\) is not divisible by cp_degree \(4\)"):
        ParallelDims.from_config(ParallelConfig(cp_degree=4), world_size=6)
    with pytest.raises(ValueError, match="cp_degree must be >= 1"):
        ParallelConfig(cp_degree=0)


def test_context_parallel_needs_divisible_heads_and_tokens():
    DiT(dit_debug()).check_context_parallel(2)  # 2 heads, 16 tokens
    with pytest.raises(ValueError, match=r"num_heads \(2\) is not divisible by cp_degree \(4\)"):
        DiT(dit_debug()).check_context_parallel(4)
    odd_grid = DiTConfig(image_size=6, patch_size=2, dim=64, num_heads=4, depth=1)  # 3 x 3 = 9 tokens
    with pytest.raises(ValueError, match=r"the 9 tokens .* are not divisible by cp_degree \(2\)"):
        DiT(odd_grid).check_context_parallel(2)


def test_unknown_checkpoint_policy_is_rejected():
    with pytest.raises(ValueError, match="none, full or selective"):
        apply_activation_checkpointing(DiT(dit_debug()), "sometimes")
