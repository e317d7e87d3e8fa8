"""Teacher networks: training with the rectified-flow objective, and safetensors save/load with config.

The 2-D teacher is a small MLP trained by flow matching (x_s = (1 - s) x0 + s eps, target v = eps - x0)
with label dropout so that classifier-free guidance works; distillation then goes through the
RF -> TrigFlow conversion exactly as for Wan or Cosmos teachers.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rcm_core.config import ConfigError, DataConfig, MLPConfig, TeacherConfig
from rcm_core.data.toy2d import Toy2DTask
from rcm_core.models.flow import FlowModel
from rcm_core.models.mlp import MLPFlowNet

log = logging.getLogger(__name__)


def build_toy2d_net(model: MLPConfig, task: Toy2DTask) -> MLPFlowNet:
    return MLPFlowNet(model, data_dim=2, num_classes=task.num_classes)


def train_toy2d_teacher(
    data: DataConfig, model: MLPConfig, teacher: TeacherConfig, *, seed: int = 0, progress=None
) -> tuple[MLPFlowNet, dict]:
    """Train an RF teacher on the 2-D mixture; returns the network and a record of how it was made."""
    torch.manual_seed(seed)
    task = Toy2DTask(data)
    net = build_toy2d_net(model, task)
    flow = FlowModel(net, "rf")
    opt = torch.optim.AdamW(net.parameters(), lr=teacher.train_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, teacher.train_steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, teacher.train_steps + 1):
        x0, cond = task.sample(teacher.train_batch_size, generator=gen)
        drop = torch.rand(cond.shape, generator=gen) < teacher.label_dropout
        cond = torch.where(drop, task.null_cond(len(cond)), cond)
        eps = torch.randn(x0.shape, generator=gen)
        # Logit-normal RF times (SD3), which weight the middle of the path where the velocity is hardest.
        s = torch.sigmoid(torch.randn(len(x0), generator=gen, dtype=torch.float64))
        loss = flow.native_loss(x0, eps, s, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None and (step % 500 == 0 or step == teacher.train_steps):
            progress(step, teacher.train_steps, loss.item())
    record = {"train_seconds": round(time.perf_counter() - start, 1), "final_loss": loss.item(), "seed": seed}
    return net.eval(), record


def save_teacher(net: torch.nn.Module, path: Path, meta: dict) -> None:
    """Weights and the config needed to rebuild them, in one safetensors file."""
    save_state(net.state_dict(), path, meta)


def save_state(state: dict[str, torch.Tensor], path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"rcm": json.dumps(meta)})
    tmp.replace(path)  # atomic: a crash never leaves a half-written teacher behind


def read_teacher_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "rcm" not in meta:
        raise ConfigError(f"teacher.path: {path} has no rcm metadata (not written by `rcm teacher train`)")
    return json.loads(meta["rcm"])


def load_toy2d_teacher(path: Path) -> tuple[MLPFlowNet, dict]:
    if not path.is_file():
        raise ConfigError(f"teacher.path: no such file {path}")
    meta = read_teacher_meta(path)
    task = Toy2DTask(DataConfig(**meta["data"]))
    net = build_toy2d_net(MLPConfig(**meta["model"]), task)
    net.load_state_dict(load_file(str(path)))
    return net.eval(), meta
