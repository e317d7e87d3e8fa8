"""The rCM step used by the parity tests: a tiny DiT teacher, synthetic images, and a recorder of every step.

Shared by the 1-rank reference (in the pytest process) and the N-rank workers, so both build the same thing.
"""

from __future__ import annotations

import contextlib
import math

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


class RandomVideoTask:
    """Video latents (B, C, F, H, W) ~ N(0, 1) and right-padded text {"tokens": (B, L, D), "mask": (B, L)}, all drawn
    from the generator passed in (N ranks with generators in the same state draw identical batches).

    The null condition (CFG's negative prompt) is either all padding (`null="padding"`: zero tokens, mask False, an
    empty negative prompt as Wan's pipeline has after padded rows are zeroed) or a fixed seeded "negative prompt"
    embedding covering half the tokens (`null="negative"`, as the Cosmos pipelines use one)."""

    def __init__(self, *, sample_shape, text_len: int, text_dim: int, null: str = "padding", device=None):
        if null not in ("padding", "negative"):
            raise ValueError(f"null must be 'padding' or 'negative', got {null!r}")
        self.sample_shape = tuple(sample_shape)
        self.text_len, self.text_dim, self.null = text_len, text_dim, null
        self.device = torch.device(device or "cpu")

    def sample(self, batch_size: int, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        cond = self.sample_cond(batch_size, generator=generator)
        return torch.randn((batch_size, *self.sample_shape), generator=generator, device=self.device), cond

    def sample_cond(self, batch_size: int, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        tokens = torch.randn((batch_size, self.text_len, self.text_dim), generator=generator, device=self.device)
        lengths = torch.randint(1, self.text_len + 1, (batch_size,), generator=generator, device=self.device)
        mask = torch.arange(self.text_len, device=self.device)[None, :] < lengths[:, None]
        return {"tokens": tokens, "mask": mask}

    def null_cond(self, batch_size: int) -> dict[str, torch.Tensor]:
        shape = (batch_size, self.text_len)
        if self.null == "padding":
            tokens = torch.zeros((*shape, self.text_dim), device=self.device)
            return {"tokens": tokens, "mask": torch.zeros(shape, dtype=torch.bool, device=self.device)}
        gen = torch.Generator(device=self.device).manual_seed(1234)
        tokens = torch.randn((1, self.text_len, self.text_dim), generator=gen, device=self.device)
        mask = torch.arange(self.text_len, device=self.device)[None, :] < self.text_len // 2
        return {"tokens": tokens.expand(batch_size, -1, -1), "mask": mask.expand(*shape)}


def assert_same_run(got: dict, ref: dict, *, rtol: float, atol: float) -> None:
    """`got` (an N-rank run) repeats `ref` (the 1-rank run): every step's metrics and the student's and fake
    score's gradients (same names, none missing), and the final student, fake and EMA weights."""
    assert len(got["steps"]) == len(ref["steps"]) == NUM_STEPS
    for i, (g, r) in enumerate(zip(got["steps"], ref["steps"], strict=True)):
        assert g["metrics"].keys() == r["metrics"].keys()
        for key, value in r["metrics"].items():
            assert math.isclose(g["metrics"][key], value, rel_tol=rtol, abs_tol=atol), (
                i,
                key,
                g["metrics"][key],
                value,
            )
        for which in ("student_grads", "fake_grads"):
            assert g[which].keys() == r[which].keys() and len(r[which]) > 0, which
            for name, ref_grad in r[which].items():
                torch.testing.assert_close(
                    g[which][name], ref_grad, rtol=rtol, atol=atol, msg=f"step {i} {which} {name}"
                )
    assert got["final"].keys() == ref["final"].keys()
    for which, ref_params in ref["final"].items():
        assert got["final"][which].keys() == ref_params.keys(), which
        for name, ref_param in ref_params.items():
            torch.testing.assert_close(
                got["final"][which][name], ref_param, rtol=rtol, atol=atol, msg=f"{which} {name}"
            )


def assert_resumes_exactly(got: dict) -> None:
    """The run's last step, repeated by a fresh Distiller from the checkpoint written before it, is bit-exact:
    metrics, gradients and the weights after it."""
    last = got["steps"][-1]
    assert got["resumed_step"]["metrics"] == last["metrics"]
    for which in ("student_grads", "fake_grads"):
        for name, grad in last[which].items():
            assert torch.equal(got["resumed_step"][which][name], grad), (which, name)
    for which, params_ in got["final"].items():
        for name, param in params_.items():
            assert torch.equal(got["resumed_final"][which][name], param), (which, name)


def max_rel_difference(got: dict, ref: dict) -> float:
    """The largest relative difference over every compared metric and gradient (for the test's printout)."""
    worst = 0.0
    for g, r in zip(got["steps"], ref["steps"], strict=True):
        for key, value in r["metrics"].items():
            worst = max(worst, abs(g["metrics"][key] - value) / max(abs(value), 1e-30))
        for which in ("student_grads", "fake_grads"):
            for name, ref_grad in r[which].items():
                worst = max(worst, ((g[which][name] - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30)).item())
    return worst
