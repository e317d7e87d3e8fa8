"""Tiny random Cosmos-Predict2 transformers built with the real diffusers class, for tests and benchmarks.

`tiny_cosmos_config()` is a Predict2 text-to-image/video config (in_channels == out_channels, concat_padding_mask,
no extra position embedding) with small sizes; `build_tiny_cosmos` instantiates `CosmosTransformer3DModel` from it
with every weight random (diffusers initialises the Cosmos norms to ones and nothing to zero, but the weights are
redrawn anyway so that every path carries signal); `save_tiny_cosmos` writes it with `save_pretrained` (the
`transformer/` layout a user uploads), sharded with an index when `max_shard_size` is given.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_cosmos_config(**overrides) -> dict:
    """2 layers, 2 heads of dim 16 (RoPE split t/h/w = 8/4/4: unequal, as 44/42/42 at dim 128), 4 latent channels,
    text width 8."""
    cfg = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2.0,
        text_embed_dim=8,
        adaln_lora_dim=8,
        max_size=(8, 16, 16),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 3.0, 3.0),  # NTK on every axis (published: (1, 4, 4) T2I, (1, 3, 3) / (20/24, 2, 2) video)
        concat_padding_mask=True,
        extra_pos_embed_type=None,
    )
    cfg.update(overrides)
    return cfg


def build_tiny_cosmos(seed: int = 0, **overrides):
    """A tiny CosmosTransformer3DModel with random float32 weights (loaded back in float64 by the tests: exact)."""
    import diffusers

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = diffusers.CosmosTransformer3DModel(**tiny_cosmos_config(**overrides))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm.weight"):
                    p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))  # RMSNorm gains around 1
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.eval()


def save_tiny_cosmos(path: str | Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    """save_pretrained a tiny random model (float32 weights) into `path`; returns the path."""
    model = build_tiny_cosmos(seed, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kwargs)
    return Path(path)


def tiny_inputs(batch: int = 2, frames: int = 1, size: int = 8, text_len: int = 6, seed: int = 1, channels: int = 4):
    """(x (B, C, T, H, W), cond {"tokens", "mask"}) in float64; the second prompt is right-padded."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, frames, size, size, generator=gen, dtype=torch.float64)
    tokens = torch.randn(batch, text_len, 8, generator=gen, dtype=torch.float64)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[1:, text_len // 2 :] = False
    return x, {"tokens": tokens, "mask": mask}
