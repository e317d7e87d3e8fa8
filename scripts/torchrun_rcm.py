"""torchrun entry point: rCM distillation of a DiT on any number of processes (FSDP2 + Ulysses context parallel).

    torchrun --nproc-per-node G scripts/torchrun_rcm.py --cp-degree 2 --steps 6 --results runs/bench.jsonl

Every rank draws the same global batch (synthetic images and condition tokens, rcm_core.data.random_images),
the networks split it over fsdp_degree ranks and each sample's tokens over cp_degree ranks. Rank 0 logs
each step and appends one JSON line per run to --results: step time (mean over the steps after --warmup-steps),
tokens/s per GPU (global batch x tokens per sample / step time / world size; one rCM step runs the networks
about 20 times on those tokens, see docs/benchmarks.md) and the peak allocated memory over ranks. NCCL on
CUDA, gloo on CPU. With --checkpoint-dir it saves sharded DCP checkpoints (every --checkpoint-every steps and
at the end); --resume [PATH] continues from one (default: the latest).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rcm_core.checkpoint import DirectoryStore  # noqa: E402
from rcm_core.config import DistillConfig, LossConfig, TrainConfig  # noqa: E402
from rcm_core.data.random_images import RandomImageTask  # noqa: E402
from rcm_core.distill import Distiller  # noqa: E402
from rcm_core.models.dit import DiT, DiTConfig, num_params  # noqa: E402
from rcm_core.parallel.parallel_dims import ParallelConfig, ParallelDims  # noqa: E402
from rcm_core.parallel.parallelize import net_copier  # noqa: E402
from rcm_core.trainer import Trainer, TrainHooks  # noqa: E402

log = logging.getLogger("torchrun_rcm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--fsdp-degree", "--dp-shard-degree", dest="fsdp_degree", type=int, default=-1, help="-1: world / cp degree"
    )
    p.add_argument("--cp-degree", type=int, default=1)
    p.add_argument(
        "--activation-checkpointing",
        "--activation-checkpoint",
        dest="activation_checkpointing",
        choices=["none", "full", "selective"],
        default="full",
    )
    p.add_argument("--mixed-precision", choices=["none", "bfloat16"], default=None, help="default: bf16 on CUDA")
    # DiT: the defaults give 32,400 tokens per sample (a 360 x 360 x 16 latent, patch 2) and ~0.4 B parameters
    p.add_argument("--image-size", type=int, default=360)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--cond-len", type=int, default=64)
    p.add_argument("--cond-dim", type=int, default=1024)
    p.add_argument("--attention-backend", choices=["auto", "math", "fused"], default="auto")
    # rCM
    p.add_argument("--batch-size", type=int, default=1, help="global batch")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup-steps", type=int, default=1, help="steps left out of the timing (compile, autotune)")
    p.add_argument("--critic-ratio", type=int, default=1)
    p.add_argument("--max-rollout-steps", type=int, default=1)
    p.add_argument("--dmd-weight", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    # outputs
    p.add_argument("--results", type=Path, default=None, help="append one JSON line per run (rank 0)")
    p.add_argument("--label", default="", help="free text stored with the result")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="sharded DCP checkpoints: step-<N>/ in here")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="a step-<N> dir, or the latest one")
    return p.parse_args(argv)


def init_distributed() -> torch.device:
    """Process group from torchrun's environment; one GPU per local rank when CUDA is there."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=10))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    return device


def build_distiller(args: argparse.Namespace, device: torch.device) -> tuple[Distiller, DiTConfig, ParallelConfig]:
    cfg = DiTConfig(
        image_size=args.image_size,
        in_channels=args.channels,
        patch_size=args.patch_size,
        dim=args.dim,
        depth=args.depth,
        num_heads=args.heads,
        cond_dim=args.cond_dim,
        attention_backend=args.attention_backend,
    )
    mixed = args.mixed_precision or ("bfloat16" if device.type == "cuda" else "none")
    pconfig = ParallelConfig(
        fsdp_degree=args.fsdp_degree,
        cp_degree=args.cp_degree,
        activation_checkpointing=args.activation_checkpointing,
        mixed_precision=mixed,
    )
    dims = ParallelDims.from_config(pconfig, dist.get_world_size())
    dims.build_mesh(device.type)
    loss = LossConfig(
        critic_ratio=args.critic_ratio, max_rollout_steps=args.max_rollout_steps, dmd_weight=args.dmd_weight
    )
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, log_every=1, eval_every=0)
    config = DistillConfig(loss=loss, train=train)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        teacher = DiT(cfg)  # on CPU, identical on every rank; a real run loads its teacher here
    task = RandomImageTask(
        image_size=cfg.image_size,
        channels=cfg.in_channels,
        cond_len=args.cond_len,
        cond_dim=cfg.cond_dim,
        device=device,
    )
    copy_net = net_copier(parallel_dims=dims, config=pconfig, device=device)
    distiller = Distiller(config, teacher, task, parameterization="rf", copy_net=copy_net, device=device)
    return distiller, cfg, pconfig


class _RestoreOnly(DirectoryStore):
    """Without --checkpoint-dir: restore a --resume path, write nothing."""

    def save(self, app, extra, metrics) -> None:
        pass


def main(argv=None) -> None:
    args = parse_args(argv)
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s")
    distiller, cfg, pconfig = build_distiller(args, device)
    dims = ParallelDims.from_config(pconfig, world)
    resume_from = None if args.resume in (None, "latest") else Path(args.resume)
    store_cls = DirectoryStore if args.checkpoint_dir else _RestoreOnly
    store = store_cls(args.checkpoint_dir or Path("."), resume=bool(args.resume), resume_from=resume_from)
    seconds, losses = [], []

    def log_step(step: int, metrics: dict[str, float]) -> None:
        # log_every = 1: reading the loss waits for the device, so this is the step's wall time
        seconds.append(metrics["wall_seconds_per_step"])
        losses.append(metrics["loss"])
        log.info("step %d loss %.5f  %.2f s", step, metrics["loss"], seconds[-1])

    trainer = Trainer(distiller, store, TrainHooks(log=log_step))
    if args.resume:
        if trainer.resume() is None:
            raise SystemExit(f"--resume: no complete checkpoint under {args.checkpoint_dir}")
        log.info("resumed from step %d", distiller.step)
    # --steps counts the steps of this launch; checkpoints: every --checkpoint-every and at the end
    train = replace(distiller.config.train, steps=distiller.step + args.steps, checkpoint_every=args.checkpoint_every)
    distiller.config = replace(distiller.config, train=train)
    tokens_per_sample = (cfg.image_size // cfg.patch_size) ** 2
    log.info(
        "world %d: dp_shard %d x cp %d, DiT %.3f B params, %d tokens/sample, global batch %d",
        world, dims.dp_shard_degree, dims.cp_degree, num_params(distiller.student) / 1e9, tokens_per_sample,
        args.batch_size,
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    trainer.run()
    peak = torch.tensor(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    timed = seconds[args.warmup_steps :] or seconds
    step_s = statistics.mean(timed)
    result = {
        "label": args.label,
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "world_size": world,
        "dp_shard_degree": dims.dp_shard_degree,
        "cp_degree": dims.cp_degree,
        "mixed_precision": pconfig.mixed_precision,
        "activation_checkpoint": args.activation_checkpointing,
        "params": num_params(distiller.student),
        "dit": {"dim": cfg.dim, "depth": cfg.depth, "heads": cfg.num_heads, "patch": cfg.patch_size},
        "tokens_per_sample": tokens_per_sample,
        "global_batch": args.batch_size,
        "timed_steps": len(timed),
        "step_seconds": round(step_s, 4),
        "step_seconds_all": [round(s, 4) for s in seconds],
        "tokens_per_s_per_gpu": round(args.batch_size * tokens_per_sample / step_s / world, 1),
        "peak_memory_gib": round(peak.item() / 2**30, 2),
        "losses": losses,
        "argv": sys.argv[1:],
    }
    if rank == 0:
        log.info("result %s", json.dumps(result))
        if args.results:
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with args.results.open("a") as f:
                f.write(json.dumps(result) + "\n")
    dist.destroy_process_group()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
