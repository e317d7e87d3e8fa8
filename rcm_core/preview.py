"""Preview samples of a distillation run: the EMA student of one checkpoint, sampled with the few-step sampler.

Used by `rcm sample --checkpoint` (shapes) and by the service's sample requests (workers/samples.py,
`POST /v1/jobs/{id}/samples`). Loading takes only the EMA weights out of the checkpoint (DCP reads the keys
asked for): no optimizer state, fake score or training data is rebuilt, so a preview of a diffusers job does not
draw the teacher's sample pool again.

- shapes (text-to-image): captions of the shapes grammar, `num_samples` images each, one grid row per caption
  (`shapes_grid`; the images as uint8 too);
- diffusers (Wan2.1 / Cosmos-Predict2): encoded prompts (a .safetensors of tokens, mask and optional noise, as
  `rcm sample --student --prompt-embeds` takes) -> latents (`diffusers_latents`), shown as a latent preview PNG
  (channels 0-2 of the first frame: not decoded video; decode with `rcm sample --student ... --vae`).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from rcm_core.config import ConfigError, DistillConfig, LoraConfig
from rcm_core.models.flow import FlowModel


def load_ema_student(
    checkpoint_dir: Path, teacher_net: nn.Module, parameterization: str, lora: LoraConfig | None = None
) -> FlowModel:
    """The EMA student of a checkpoint directory (DCP shards, any number of ranks): a copy of the teacher's
    network with the checkpoint's `ema.model` weights. With `lora` (the job's student.lora), the student is the
    teacher's network with those adapters (rcm_core.teachers.lora.with_adapters) and the checkpoint's EMA holds the
    averaged adapters alone (the base weights are the teacher's).

    Raises:
        ConfigError: the directory holds no complete checkpoint, or its EMA is not this network's.
    """
    import torch.distributed.checkpoint as dcp

    from rcm_core.checkpoint import MANIFEST

    if not (checkpoint_dir / MANIFEST).is_file():
        raise ConfigError(f"{checkpoint_dir}: not a complete checkpoint (no {MANIFEST})")
    net = copy.deepcopy(teacher_net)
    if lora is not None:
        from rcm_core.teachers.lora import is_adapter, with_adapters

        net = with_adapters(net, lora)
    model = FlowModel(net, parameterization).eval().requires_grad_(False)
    wanted = model.state_dict()
    if lora is not None:  # the EMA of a LoRA student averages and saves the adapters only (rcm_core.ema)
        wanted = {k: v for k, v in wanted.items() if is_adapter(k)}
    state = {"app": {"ema": {"model": wanted}}}
    # The checkpoint's EMA must hold exactly this network's keys: extra ones (e.g. adapters a student was built
    # with) would be skipped by DCP without a word, and the preview would show the wrong weights.
    stored = {
        k.removeprefix("app.ema.model.")
        for k in dcp.FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata
        if k.startswith("app.ema.model.")
    }
    if stored != set(wanted):
        extra, missing = len(stored - set(wanted)), len(set(wanted) - stored)
        raise ConfigError(
            f"{checkpoint_dir.name}: its EMA student is not the teacher's architecture ({extra} extra, {missing} "
            "missing parameter(s)): this preview cannot rebuild it"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(checkpoint_dir))  # only these keys are read
    result = model.load_state_dict(state["app"]["ema"]["model"], strict=lora is None)
    if result.unexpected_keys:  # (strict=False with LoRA: the base weights stay the teacher's, as loaded above)
        raise ConfigError(f"{checkpoint_dir.name}: unexpected EMA parameters {result.unexpected_keys[:3]}")
    return model


def checkpoint_step(checkpoint_dir: Path) -> int:
    from rcm_core.checkpoint import MANIFEST

    return int(json.loads((checkpoint_dir / MANIFEST).read_text())["step"])


def shapes_grid(
    model: FlowModel,
    cfg: DistillConfig,
    captions: list[str],
    *,
    num_samples: int,
    steps: int,
    seed: int,
    grid: Path | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """`num_samples` images per caption of a text-to-image student; each caption is sampled on its own from `seed`,
    so its images depend neither on the other captions nor on their order.

    Args:
        grid: where to write the PNG (one row per caption, up to 16 images a row); None: no PNG.

    Returns:
        (uint8 images (len(captions) * num_samples, H, W, 3), the caption of each image)

    Raises:
        ConfigError: a caption outside the shapes grammar, naming its position (prompts[i]).
    """
    import numpy as np

    from rcm_core.data.shapes import parse_caption
    from rcm_core.eval import shapes as ev

    prompts = []
    for i, caption in enumerate(captions):
        try:
            prompts.append(parse_caption(caption))
        except ValueError as exc:
            raise ConfigError(f"prompts[{i}]: {exc}") from None
    sampler = ev.student_sampler(model, mid_times=cfg.eval.student_mid_times)
    images = np.concatenate([sampler([p] * num_samples, steps, seed) for p in prompts])
    canonical = [p.caption() for p in prompts]
    if grid is not None:
        rows = {f"{c} ({steps}-step)": images[i * num_samples : (i + 1) * num_samples] for i, c in enumerate(canonical)}
        grid.parent.mkdir(parents=True, exist_ok=True)
        ev.image_grid(rows, grid, columns=min(num_samples, 16))
    return torch.from_numpy(images), [c for c in canonical for _ in range(num_samples)]


def diffusers_latents(
    model: FlowModel,
    embeds: dict[str, torch.Tensor],
    *,
    times: list[float],
    seed: int,
    latent_shape: list[int] | None,
    grid: Path | None = None,
) -> torch.Tensor:
    """Few-step samples of a diffusers student for encoded prompts (rcm_core.export.load_prompt_embeds), with the
    job evaluation's sampler (rcm_core.export.sample_student); the noise is the file's "noise", else drawn from
    `seed` in `latent_shape`.

    Args:
        grid: where to write a latent preview PNG (rcm_core.tasks.diffusers.latent_grid); None: no PNG.

    Raises:
        ConfigError: no latent shape to draw noise in, tokens of the wrong width, a shape the network refuses.
    """
    from rcm_core import export

    noise = embeds.get("noise")
    if noise is None:
        if not latent_shape:
            raise ConfigError("latent_shape: unknown (the job records none and the embeddings file has no noise)")
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(embeds["tokens"]), *latent_shape), generator=gen)
    cond = {"tokens": embeds["tokens"], "mask": embeds["mask"]}
    try:
        latents = export.sample_student(model, cond, noise, times, seed)
    except (ValueError, RuntimeError) as exc:  # the net's own checks: token width, patch size, RoPE positions
        raise ConfigError(f"prompt embeddings do not fit the student: {str(exc).splitlines()[0][:300]}") from None
    if grid is not None:
        from rcm_core.tasks.diffusers import latent_grid

        latent_grid([(f"student {len(times)}-step", latents)], grid, columns=min(len(latents), 8))
    return latents


__all__ = ["checkpoint_step", "diffusers_latents", "load_ema_student", "shapes_grid"]
