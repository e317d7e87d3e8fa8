"""The built-in text-to-image teacher for the shapes task: a text encoder + DiT trained jointly with the
rectified-flow objective (as Wan and Cosmos are), with caption dropout so classifier-free guidance works.

    rcm teacher train --preset shapes [--set steps=30000] [--out teachers/shapes.safetensors]

Weights are stored in bf16 (the default preset is about 9 M parameters, about 18 MB) with the config and
the training record in the safetensors metadata; `load_shapes_teacher` rebuilds the float32 network.
Evaluation samples the held-out prompt set with Euler + CFG and scores it with the GenEval-style judge.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from rcm_core.data.shapes import ShapesTask, eval_prompts, to_uint8
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

    def __post_init__(self) -> None:
        if min(self.dim, self.depth, self.num_heads, self.text_dim, self.text_depth, self.steps, self.batch_size) < 1:
            raise ValueError("sizes, steps and batch_size must be >= 1")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")

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
    """RF training on freshly rendered batches; bf16 autocast on CUDA (the time path stays float32)."""
    torch.manual_seed(cfg.seed)
    device = _device()
    task = ShapesTask(split="train")
    net = build_shapes_net(cfg, task).to(device)
    flow = FlowModel(net, "rf")
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x0, cond = task.sample(cfg.batch_size, generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        null = task.null_cond(cfg.batch_size)
        cond = {k: torch.where(drop[:, None], null[k], v) for k, v in cond.items()}
        eps = torch.randn(x0.shape, generator=gen)
        s = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen, dtype=torch.float64))  # logit-normal RF time
        x0, eps, s = x0.to(device), eps.to(device), s.to(device)
        cond = {k: v.to(device) for k, v in cond.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = flow.native_loss(x0, eps, s, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if progress is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            progress(step, cfg.steps, loss.item())
    record = {
        "train_seconds": round(time.perf_counter() - start, 1),
        "final_loss": loss.item(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    return net.eval(), record


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
