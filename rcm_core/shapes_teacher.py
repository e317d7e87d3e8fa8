"""The built-in text-to-image teacher for the shapes task: a text encoder + DiT trained jointly with the
rectified-flow objective (as Wan and Cosmos are), with caption dropout so classifier-free guidance works.

    rcm teacher train --preset shapes [--set steps=30000] [--out teachers/shapes.safetensors]

Weights are stored in bf16 (the default preset is about 9 M parameters, about 18 MB) with the config and
the training record in the safetensors metadata; `load_shapes_teacher` rebuilds the float32 network.
Evaluation samples the held-out prompt set with Euler + CFG and scores it with the GenEval-style judge.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from rcm_core.data.shapes import PooledShapesTask, ShapesTask, eval_prompts, to_uint8
from rcm_core.eval.geneval import score
from rcm_core.models.dit import DiTConfig
from rcm_core.models.flow import FlowModel, guided_f
from rcm_core.models.text import TextEncoderConfig, TextToImageNet
from rcm_core.sampling import sample_euler
from rcm_core.teacher import read_teacher_meta, save_state


@dataclass(kw_only=True)
class ShapesTeacherConfig:
    dim: int = 256  # DiT width
    depth: int = 6  # DiT blocks
    num_heads: int = 4
    patch_size: int = 2  # 32x32 images -> 256 tokens
    text_dim: int = 128  # text encoder width (= DiT condition width)
    text_depth: int = 2
    steps: int = 30000  # optimizer steps
    batch_size: int = 128
    lr: float = 3e-4  # AdamW
    caption_dropout: float = 0.1  # probability of the empty caption (for CFG)
    seed: int = 0
    guidance_scale: float = 3.0  # default sampler: CFG weight
    sample_steps: int = 50  # default sampler: Euler steps
    log_every: int = 500
    warmup_steps: int = 500  # linear learning-rate warm-up, then constant
    ema_decay: float = 0.999  # the saved weights are this EMA of the trained ones (0 = save the raw weights)
    pool_size: int = 0  # > 0: pre-render this many scenes once (GPU training); 0: render every batch afresh
    pool_workers: int = 0  # processes rendering the pool (0/1 = in this process)
    max_minutes: float = 0.0  # > 0: stop early (at a logged step) once training has run this long
    eval_samples_per_prompt: int = 8  # evaluation: samples per evaluation prompt
    init: str | None = None  # start from these teacher weights (a .safetensors of this config) instead of scratch

    def __post_init__(self) -> None:
        if min(self.dim, self.depth, self.num_heads, self.text_dim, self.text_depth, self.steps, self.batch_size) < 1:
            raise ValueError("sizes, steps and batch_size must be >= 1")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if min(self.warmup_steps, self.pool_size, self.pool_workers, self.max_minutes) < 0:
            raise ValueError("warmup_steps, pool_size, pool_workers and max_minutes must be >= 0")

    def dit_config(self) -> DiTConfig:
        return DiTConfig(
            image_size=32,
            in_channels=3,
            patch_size=self.patch_size,
            dim=self.dim,
            depth=self.depth,
            num_heads=self.num_heads,
            cond_dim=self.text_dim,
        )

    def text_config(self, vocab_size: int) -> TextEncoderConfig:
        return TextEncoderConfig(vocab_size=vocab_size, dim=self.text_dim, depth=self.text_depth, num_heads=4)


def build_shapes_net(cfg: ShapesTeacherConfig, task: ShapesTask) -> TextToImageNet:
    return TextToImageNet(cfg.dit_config(), cfg.text_config(len(task.tokenizer)))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_shapes_teacher(cfg: ShapesTeacherConfig, *, progress=None) -> tuple[TextToImageNet, dict]:
    """RF training with caption dropout; bf16 autocast on CUDA (the time path stays float32).

    Returns the EMA of the weights (or the raw weights when ema_decay = 0) and a training record.
    """
    torch.manual_seed(cfg.seed)
    device = _device()
    start = time.perf_counter()
    if cfg.pool_size > 0:
        task: ShapesTask = PooledShapesTask(cfg.pool_size, seed=cfg.seed, device=device, workers=cfg.pool_workers)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
    else:
        task, gen = ShapesTask(split="train"), torch.Generator().manual_seed(cfg.seed)
    render_seconds = time.perf_counter() - start
    net = build_shapes_net(cfg, task)
    if cfg.init:
        net.load_state_dict({k: v.float() for k, v in load_file(cfg.init).items()})
    net = net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False) if cfg.ema_decay > 0 else None
    flow = FlowModel(net, "rf")
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    null = {k: v.to(device) for k, v in task.null_cond(cfg.batch_size).items()}
    start = time.perf_counter()
    step, loss = 0, torch.zeros(())
    for step in range(1, cfg.steps + 1):
        x0, cond = task.sample(cfg.batch_size, generator=gen)
        x0, cond = x0.to(device), {k: v.to(device) for k, v in cond.items()}
        drop = (torch.rand(cfg.batch_size, generator=gen, device=gen.device) < cfg.caption_dropout).to(device)
        cond = {k: torch.where(drop[:, None], null[k], v) for k, v in cond.items()}
        eps = torch.randn(x0.shape, generator=gen, device=gen.device).to(device)
        z = torch.randn(cfg.batch_size, generator=gen, device=gen.device, dtype=torch.float64)
        s = torch.sigmoid(z).to(device)  # logit-normal RF time
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / max(cfg.warmup_steps, 1))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = flow.native_loss(x0, eps, s, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
        logged = step % cfg.log_every == 0 or step == cfg.steps
        if progress is not None and logged:
            progress(step, cfg.steps, loss.item())
        if logged and cfg.max_minutes and time.perf_counter() - start > 60 * cfg.max_minutes:
            break  # time budget spent: keep what was trained (the record says how many steps)
    record = {
        "steps_done": step,
        "train_seconds": round(time.perf_counter() - start, 1),
        "render_seconds": round(render_seconds, 1),
        "final_loss": loss.item(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    out = ema if ema is not None else net
    return out.eval(), record


@torch.no_grad()
def evaluate_shapes(
    net: torch.nn.Module, *, samples_per_prompt: int, num_steps: int, guidance_scale: float, seed: int = 0, prompts=None
) -> dict[str, float]:
    """GenEval-style score of Euler + CFG samples over the evaluation prompts (per category and overall)."""
    task, device = ShapesTask(), next(net.parameters()).device
    prompts = [p for p in (prompts or eval_prompts()) for _ in range(samples_per_prompt)]
    flow = FlowModel(net, "rf")
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(prompts), 256):
        chunk = prompts[i : i + 256]
        cond = {k: v.to(device) for k, v in task._encode([p.caption() for p in chunk]).items()}
        null = {k: v.to(device) for k, v in task.null_cond(len(chunk)).items()}
        noise = torch.randn((len(chunk), 3, 32, 32), generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x0 = sample_euler(lambda x, t, c=cond, n=null: guided_f(flow, x, t, c, n, guidance_scale), noise, num_steps)
        images.extend(to_uint8(x0))
    return score(prompts, list(np.asarray(images)))


def save_shapes_teacher(net: TextToImageNet, path: Path, cfg: ShapesTeacherConfig, record: dict) -> None:
    meta = {"task": "shapes", "parameterization": "rf", "config": dataclasses.asdict(cfg), "training": record}
    save_state({k: v.detach().to(torch.bfloat16).cpu() for k, v in net.state_dict().items()}, path, meta)


def load_shapes_teacher(path: Path) -> tuple[TextToImageNet, dict]:
    meta = read_teacher_meta(path)
    cfg = ShapesTeacherConfig(**meta["config"])
    net = build_shapes_net(cfg, ShapesTask())
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval(), meta
