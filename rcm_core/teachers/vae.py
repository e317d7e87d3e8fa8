"""Decoding a student's latents to frames with the teacher pipeline's VAE, loaded from a diffusers folder.

Both families' pipelines (WanPipeline, Cosmos2TextToImage/VideoToWorldPipeline) decode with AutoencoderKLWan and
un-normalise the latents per channel first, x = z * latents_std + latents_mean (the VAE's config.json), which is
what `decode_latents` does. NOTE: Cosmos' pipeline also divides by its scheduler's sigma_data, 1.0 in the published
Cosmos-Predict2 scheduler configs; a VAE folder with another sigma_data is not accounted for here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rcm_core.config import ConfigError

VAE_CLASSES = ("AutoencoderKLWan",)


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32):
    """The VAE of a diffusers folder (the pipeline's vae/ subfolder, or the pipeline root holding one)."""
    path = Path(path)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"--vae: {path} is not a diffusers VAE folder (no config.json)")
    try:
        class_name = json.loads(cfg_path.read_text()).get("_class_name")
    except (ValueError, AttributeError):
        raise ConfigError(f"--vae: {cfg_path} is not a JSON object") from None
    if class_name not in VAE_CLASSES:
        raise ConfigError(f"--vae: _class_name {str(class_name)[:64]!r} is not supported; supported: {VAE_CLASSES}")
    import diffusers

    return getattr(diffusers, class_name).from_pretrained(str(path), torch_dtype=dtype).eval()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, F, H, W) -> frames uint8 (B, T, H', W', 3), as the pipelines post-process them."""
    cfg = vae.config
    if latents.shape[1] != cfg.z_dim:
        raise ConfigError(
            f"--vae: the VAE takes {cfg.z_dim} latent channels, the student's latents have {latents.shape[1]}"
        )
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape)
    z = (latents.float() * std + mean).to(vae.dtype)
    video = vae.decode(z, return_dict=False)[0].float()  # (B, 3, T, H', W') in [-1, 1]
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
