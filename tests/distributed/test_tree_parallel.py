"""Parallelizing a model tree: the shapes task's network (text encoder + DiT) under Ulysses context parallelism
(cp_degree 2), with full activation checkpointing and FSDP2 (the DiT per block, the encoder as its own unit),
matches the single-process Distiller step by step, and resumes from its sharded checkpoint exactly.

Tolerance: float32, relative 1e-4 (measured below 1e-5): sharding tokens only reorders sums (all-to-alls move
whole heads, the reduce-scatter adds two partial gradients); a wrong shard or an averaged gradient is O(1).
"""

import json
import math
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

from rcm_core.checkpoint import load_checkpoint, save_checkpoint
from rcm_core.config import DataConfig, DistillConfig, LossConfig, OptimConfig, TrainConfig
from rcm_core.data.shapes import ShapesTask
from rcm_core.distill import Distiller
from rcm_core.models.dit import DiTConfig
from rcm_core.models.text import TextEncoderConfig, TextToImageNet
from rcm_core.parallel.parallel_dims import ParallelConfig, ParallelDims
from rcm_core.parallel.parallelize import net_copier
from tests.distributed.harness import spawn

NUM_STEPS = 3
RTOL = 1e-4


def _config() -> DistillConfig:
    loss = LossConfig(dmd_weight=0.5, critic_ratio=1, max_rollout_steps=2, tangent_warmup_steps=2)
    return DistillConfig(
        task="shapes",
        data=DataConfig(dataset="shapes"),
        loss=loss,
        optim=OptimConfig(lr=1e-3),
        train=TrainConfig(steps=NUM_STEPS, batch_size=2),
    )


def _teacher() -> TextToImageNet:
    """32x32 images in 8x8 patches (16 tokens), 2 heads; zero-initialised layers perturbed so all get gradients."""
    task = ShapesTask()
    dit = DiTConfig(image_size=32, in_channels=3, patch_size=8, dim=32, depth=2, num_heads=2, cond_dim=16)
    text = TextEncoderConfig(vocab_size=len(task.tokenizer), dim=16, depth=1, num_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = TextToImageNet(dit, text)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return net


def _distiller(copy_net=None) -> Distiller:
    return Distiller(_config(), _teacher(), ShapesTask(), parameterization="rf", copy_net=copy_net)


def _run(rank: int, world: int, out_dir: str) -> None:
    out = Path(out_dir)
    config = ParallelConfig(cp_degree=2, fsdp_degree=1, activation_checkpointing="full")
    dims = ParallelDims.from_config(config, world)
    dims.build_mesh("cpu")
    d = _distiller(net_copier(parallel_dims=dims, config=config, device="cpu"))
    losses = [d.train_step()["loss"] for _ in range(NUM_STEPS - 1)]
    save_checkpoint(d, out / "ckpt", d.step)
    losses.append(d.train_step()["loss"])
    resumed = _distiller(net_copier(parallel_dims=dims, config=config, device="cpu"))
    load_checkpoint(resumed, out / "ckpt" / f"step-{NUM_STEPS - 1}")
    net = d.student.net
    units = {
        "root": isinstance(net, FSDPModule),
        "text": isinstance(net.text, FSDPModule),
        "blocks": all(isinstance(b, FSDPModule) for b in net.dit.blocks),
    }
    result = {"losses": losses, "replay": resumed.train_step()["loss"], "units": units}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def test_text_to_image_tree_under_context_parallel_matches_one_process(tmp_path):
    torch.manual_seed(0)
    ref = _distiller()
    reference = [ref.train_step()["loss"] for _ in range(NUM_STEPS)]
    spawn(_run, 2, str(tmp_path), timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["units"] == {"root": True, "text": True, "blocks": True} for r in ranks)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    for got, want in zip(ranks[0]["losses"], reference, strict=True):
        assert math.isclose(got, want, rel_tol=RTOL), (ranks[0]["losses"], reference)
    assert all(r["replay"] == r["losses"][-1] for r in ranks)  # exact resume from the sharded checkpoint
