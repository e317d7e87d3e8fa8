"""Tiny random Wan2.1 T2V transformers built with the real diffusers class, for tests and e2e runs.

`wan_tiny_config()` is a WanTransformer3DModel config small enough for CPU tests (2 layers, 2 heads of dim 16,
text width 24); `build_wan_tiny()` makes the diffusers model with random weights (its zero-free init perturbed,
so every path contributes); `save_wan_tiny(path)` writes it with `save_pretrained` (config.json +
safetensors), the layout `rcm_core.teachers.load_diffusers_teacher` reads. `wan_inputs()` draws a latent,
RF times and right-padded text tokens for it.
"""

from __future__ import annotations

from pathlib import Path

import torch

LATENT = (3, 4, 8)  # latent frames, height, width: 3 x 2 x 4 = 24 tokens with patch (1, 2, 2); no two axes alike
TEXT_LEN = 6


def wan_tiny_config(**overrides) -> dict:
    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
    )
    cfg.update(overrides)
    return cfg


def build_wan_tiny(*, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A diffusers WanTransformer3DModel with random weights (the same for a given seed on any rank)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**wan_tiny_config(**overrides))
        with torch.no_grad():
            # diffusers initialises biases and RMSNorm/LayerNorm weights to constants: perturb everything
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def save_wan_tiny(path: str | Path, *, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    """save_pretrained a tiny random model to `path` (float32); returns the path."""
    model = build_wan_tiny(seed=seed, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kwargs)
    return Path(path)


def wan_inputs(batch: int = 2, *, seed: int = 1, dtype: torch.dtype = torch.float64, channels: int = 4, text_dim=24):
    """x (B, C, F, H, W), TrigFlow times t (B,) float64, cond with the last rows of sample 1.. padded."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *LATENT, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.rand(batch, generator=gen, dtype=torch.float64) * 1.2 + 0.2
    tokens = torch.randn(batch, TEXT_LEN, text_dim, generator=gen, dtype=torch.float64).to(dtype)
    lengths = [TEXT_LEN - 2 * (i % 2) for i in range(batch)]  # every other sample right-padded by 2
    mask = torch.arange(TEXT_LEN)[None, :] < torch.tensor(lengths)[:, None]
    return x, t, {"tokens": tokens, "mask": mask}
