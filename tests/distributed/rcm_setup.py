"""The rCM step used by the parity tests: a tiny DiT teacher, synthetic images, and a recorder of every step.

Shared by the 1-rank reference (in the pytest process) and the N-rank workers, so both build the same thing.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from rcm_core.config import DistillConfig, LossConfig, OptimConfig, TrainConfig
from rcm_core.data.random_images import RandomImageTask
from rcm_core.distill import Distiller
from rcm_core.models.dit import DiT, DiTConfig, dit_debug

NUM_STEPS = 3
COND_LEN = 5  # condition tokens per sample


def dit_config() -> DiTConfig:
    """dit_debug (8x8 images, patch 2: 16 tokens, 2 heads), so cp_degree 2 splits both."""
    return dit_debug()


def distill_config(*, batch_size: int = 4) -> DistillConfig:
    """Every term on: sCM (exact JVP), DMD with weight 0.5 (0.01 would hide it in the gradient), one critic update."""
    loss = LossConfig(dmd_weight=0.5, critic_ratio=1, max_rollout_steps=2, tangent_warmup_steps=2)
    return DistillConfig(
        loss=loss, optim=OptimConfig(lr=1e-3), train=TrainConfig(steps=NUM_STEPS, batch_size=batch_size)
    )


def teacher_net(device="cpu") -> DiT:
    """The debug DiT with its zero-initialised layers perturbed, so every weight gets a gradient."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():  # the same init on every rank, whatever the global RNG holds
        torch.manual_seed(0)
        net = DiT(dit_config())
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net.to(device)


def image_task(device="cpu") -> RandomImageTask:
    cfg = dit_config()
    return RandomImageTask(
        image_size=cfg.image_size, channels=cfg.in_channels, cond_len=COND_LEN, cond_dim=cfg.cond_dim, device=device
    )


def full_tensors(named) -> dict[str, torch.Tensor]:
    """name -> full tensor on CPU; DTensor shards are all-gathered (a collective: every rank must call it)."""
    out = {}
    for name, t in named:
        if t is None:
            continue
        out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()
    return out


def _resharded(module: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 registers the gathered weights (without .grad) while a unit stays gathered after a forward (the final
    layer, by design): reshard so named_parameters() yields the sharded DTensors the optimizer updates."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return module


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return full_tensors((n, p.grad) for n, p in _resharded(module).named_parameters())


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return full_tensors(_resharded(module).named_parameters())


def record_step(d: Distiller) -> dict:
    """One train_step: its metrics and the student's and fake score's gradients (after clipping)."""
    metrics = dict(d.train_step())  # reads every metric from the device
    metrics.pop("step_seconds")
    return {"metrics": metrics, "student_grads": grads(d.student), "fake_grads": grads(d.fake)}


def final_state(d: Distiller) -> dict:
    return {"student": params(d.student), "fake": params(d.fake), "ema": params(d.ema.model)}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def reference_run(dtype: torch.dtype = torch.float64, device: str = "cpu") -> dict:
    """The plain single-process Distiller (no rcm_core.parallel at all) for NUM_STEPS steps."""
    with default_dtype(dtype):
        d = Distiller(distill_config(), teacher_net(device), image_task(device), parameterization="rf", device=device)
        steps = [record_step(d) for _ in range(NUM_STEPS)]
        return {"steps": steps, "final": final_state(d)}
