"""The rCM step with a tiny Cosmos-Predict2 teacher (diffusers `CosmosTransformer3DModel` behind `CosmosNet`), for
the multi-rank parity test: a random video-latent task, the 1-rank reference, and the worker the ranks run.

Shared by the 1-rank reference (in the pytest process) and the N-rank workers, so both build the same thing.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as dist

from rcm_core.checkpoint import load_checkpoint, save_checkpoint
from rcm_core.distill import Distiller
from rcm_core.parallel.parallel_dims import ParallelConfig, ParallelDims
from rcm_core.parallel.parallelize import net_copier
from rcm_core.teachers.cosmos import CosmosNet
from tests.distributed import rcm_setup
from tests.teachers.cosmos_tiny import build_tiny_cosmos

FRAMES, SIZE = 2, 8  # latent T x H x W = 2 x 8 x 8: 2 x 4 x 4 = 32 tokens after patch (1, 2, 2), cp 2 splits them
TEXT_LEN, TEXT_DIM = 6, 8


def teacher_net(device="cpu") -> CosmosNet:
    """A tiny random Cosmos transformer (2 layers, 2 heads of dim 16) as the project's net, in the default dtype."""
    model = build_tiny_cosmos(seed=0).to(torch.get_default_dtype())
    return CosmosNet.from_diffusers(model, attention_backend="math").to(device)


def video_task(device="cpu") -> rcm_setup.RandomVideoTask:
    """Random latents and text; the null condition is a fixed negative-prompt embedding, as Cosmos pipelines use."""
    return rcm_setup.RandomVideoTask(
        sample_shape=(4, FRAMES, SIZE, SIZE), text_len=TEXT_LEN, text_dim=TEXT_DIM, null="negative", device=device
    )


def reference_run(dtype: torch.dtype = torch.float64) -> dict:
    """The plain single-process Distiller for NUM_STEPS steps."""
    with rcm_setup.default_dtype(dtype):
        d = Distiller(rcm_setup.distill_config(), teacher_net(), video_task(), parameterization="rf", device="cpu")
        steps = [rcm_setup.record_step(d) for _ in range(rcm_setup.NUM_STEPS)]
        return {"steps": steps, "final": rcm_setup.final_state(d)}


def _parallel_distiller(world: int, dp: int, cp: int, config: ParallelConfig) -> Distiller:
    dims = ParallelDims(dp_shard_degree=dp, cp_degree=cp, world_size=world)
    dims.build_mesh("cpu")
    copy_net = net_copier(parallel_dims=dims, config=config, device="cpu")
    return Distiller(
        rcm_setup.distill_config(), teacher_net(), video_task(), parameterization="rf", copy_net=copy_net, device="cpu"
    )


def run_cosmos_rcm_steps(rank: int, world: int, dp: int, cp: int, ac: str, out_path: str, ckpt_root: str) -> None:
    """NUM_STEPS rCM steps on dp x cp ranks (float64), with a checkpoint before the last one; then a fresh Distiller
    resumes from it and repeats the last step. Rank 0 writes every step's metrics and gradients and the weights."""
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float64)
    config = ParallelConfig(fsdp_degree=dp, cp_degree=cp, activation_checkpointing=ac)
    d = _parallel_distiller(world, dp, cp, config)
    steps, path = [], None
    for i in range(rcm_setup.NUM_STEPS):
        if i == rcm_setup.NUM_STEPS - 1:
            path = save_checkpoint(d, Path(ckpt_root), d.step)
        steps.append(rcm_setup.record_step(d))
    result = {"steps": steps, "final": rcm_setup.final_state(d)}
    resumed = _parallel_distiller(world, dp, cp, config)
    load_checkpoint(resumed, path)
    result["resumed_step"] = rcm_setup.record_step(resumed)
    result["resumed_final"] = rcm_setup.final_state(resumed)
    if dist.get_rank() == 0:
        torch.save(result, out_path)


def run_cosmos_mixed_precision(rank: int, world: int, out_path: str) -> None:
    """bf16 FSDP mixed precision with CP over `world` ranks, without, with full and with selective checkpointing:
    the dtypes on the time path and in the blocks, and two steps' metrics and student gradients."""
    torch.use_deterministic_algorithms(True)
    result = {}
    for checkpointing in ("none", "full", "selective"):
        config = ParallelConfig(cp_degree=world, activation_checkpointing=checkpointing, mixed_precision="bfloat16")
        d = _parallel_distiller(world, 1, world, config)
        dtypes: dict[str, torch.dtype] = {}
        net = d.student.net
        watched = {"time_embed": net.time_embed, "modulation": net.blocks[0].norm1, "ff": net.blocks[0].ff.net[2]}
        for name, module in watched.items():
            module.register_forward_hook(functools.partial(_record_dtype, dtypes, name))
        steps = [rcm_setup.record_step(d) for _ in range(2)]
        result[checkpointing] = {"steps": steps, "dtypes": dtypes}
    if dist.get_rank() == 0:
        torch.save(result, out_path)


def _record_dtype(dtypes: dict, name: str, module, args, output) -> None:
    out = output[0] if isinstance(output, tuple) else output
    dtypes.setdefault(name, out.dtype)
