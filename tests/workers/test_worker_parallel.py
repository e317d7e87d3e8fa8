"""The worker's multi-rank path without Ray: 2 gloo ranks build the Distiller the way `train_loop_per_worker` does
(workers/distributed.py: ParallelDims, sharded copies of the 2-D MLP teacher) and must match the single-process
Distiller step by step, gather the EMA student for rank 0's evaluation, agree on rank 0's decisions, and resume
from their sharded checkpoint exactly.

Tolerance: float32 (the 2-D task draws float32 data), relative 1e-5 (measured: 1e-6). Sharding only changes the
order of floating-point sums (each rank's GEMMs over half the rows, a reduce-scatter adding the two partial
gradients); a real fault (a wrong shard, averaged instead of summed gradients, a rank drawing a different batch)
is O(1).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from rcm_core.checkpoint import load_checkpoint, save_checkpoint
from rcm_core.config import ConfigError, DistillConfig, LossConfig, TrainConfig
from rcm_core.data.toy2d import Toy2DTask
from rcm_core.distill import Distiller
from rcm_core.parallel.parallel_dims import ParallelConfig
from rcm_core.teacher import build_toy2d_net
from tests.distributed.harness import spawn
from workers import distributed

NUM_STEPS = 3
RTOL = 1e-5


def _config() -> DistillConfig:
    loss = LossConfig(critic_ratio=2, max_rollout_steps=2, tangent_warmup_steps=2, dmd_weight=0.5)
    return DistillConfig(loss=loss, train=TrainConfig(steps=NUM_STEPS, batch_size=16))


def _teacher():
    cfg = _config()
    with torch.random.fork_rng():  # the same weights on every rank
        torch.manual_seed(0)
        return build_toy2d_net(cfg.model, Toy2DTask(cfg.data))


def _distiller(teacher, device="cpu") -> Distiller:
    cfg, pconfig = _config(), ParallelConfig()
    dims = distributed.build_parallel_dims(pconfig, torch.device(device))
    copy_net = distributed.net_copy_fn(teacher, dims=dims, config=pconfig, device=torch.device(device))
    return Distiller(cfg, teacher, Toy2DTask(cfg.data), parameterization="rf", copy_net=copy_net, device=device)


def _ema_output(distiller: Distiller, teacher) -> list[float] | None:
    ema = distributed.full_copy(distiller.ema.model.net, teacher)
    if ema is None:
        return None
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 2, generator=gen), torch.rand(8, generator=gen)
    with torch.no_grad():
        return ema(x, t, torch.zeros(8, dtype=torch.long)).flatten().tolist()


def _run(rank: int, world: int, out_dir: str) -> None:
    out = Path(out_dir)
    teacher = _teacher()
    d = _distiller(teacher)
    losses = []
    for _ in range(NUM_STEPS - 1):
        losses.append(d.train_step()["loss"])
    save_checkpoint(d, out / "ckpt", d.step)  # every rank writes its shard into the same directory
    losses.append(d.train_step()["loss"])
    ema = _ema_output(d, teacher)
    resumed = _distiller(teacher)
    load_checkpoint(resumed, out / "ckpt" / f"step-{NUM_STEPS - 1}")
    replay = resumed.train_step()["loss"]
    decided = distributed.rank0_decides(rank == 0, torch.device("cpu"))  # rank 0 says yes, rank 1 no
    cp, cpu = ParallelConfig(cp_degree=2), torch.device("cpu")
    try:  # Ulysses splits tokens inside attention: the MLP has none
        distributed.net_copy_fn(teacher, dims=distributed.build_parallel_dims(cp, cpu), config=cp, device=cpu)
        refused = ""
    except ConfigError as exc:
        refused = str(exc)
    sharded = isinstance(d.student.net, FSDPModule) and isinstance(d.teacher.net, FSDPModule)
    result = {
        "losses": losses,
        "replay": replay,
        "ema": ema,
        "decided": decided,
        "sharded": sharded,
        "refused": refused,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def reference():
    teacher = _teacher()
    torch.manual_seed(0)
    d = _distiller(teacher)  # no process group: the plain single-process Distiller
    assert distributed.world_size() == 1 and d.student.net.__class__.__name__ == "MLPFlowNet"
    losses = [d.train_step()["loss"] for _ in range(NUM_STEPS)]
    return {"losses": losses, "ema": _ema_output(d, teacher)}


def test_two_ranks_match_one_rank_and_resume_exactly(reference, tmp_path):
    spawn(_run, 2, str(tmp_path), timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["sharded"] for r in ranks)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank computes the same full-batch loss
    for got, ref in zip(ranks[0]["losses"], reference["losses"], strict=True):
        assert math.isclose(got, ref, rel_tol=RTOL), (ranks[0]["losses"], reference["losses"])
    assert ranks[1]["ema"] is None and len(ranks[0]["ema"]) == len(reference["ema"])
    for got, ref in zip(ranks[0]["ema"], reference["ema"], strict=True):
        assert math.isclose(got, ref, rel_tol=RTOL, abs_tol=1e-6)
    assert all(r["replay"] == r["losses"][-1] for r in ranks)  # resumed from the sharded checkpoint: bit-exact
    assert [r["decided"] for r in ranks] == [True, True]  # rank 0's answer on both ranks
    assert all(r["refused"] == "resources.cp_degree=2 needs a DiT in the network, got MLPFlowNet" for r in ranks)
    shards = sorted(p.name for p in (tmp_path / "ckpt" / f"step-{NUM_STEPS - 1}").iterdir())
    assert "manifest.json" in shards and sum(n.endswith(".distcp") for n in shards) == 2
