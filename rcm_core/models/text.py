"""A small text encoder and the text-to-image flow network (text encoder + DiT with cross-attention).

The encoder (token embedding, learned positions, pre-norm transformer blocks) is trained jointly with
the DiT, as for the built-in shapes teacher. Its output does not depend on x or t, so forward-mode
tangents never flow through it: under torch.func.jvp it is a constant of the student.
Legend: B batch, Lc tokens, Dc text width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rcm_core.models.attention import attention_math
from rcm_core.models.dit import DiT, DiTConfig


@dataclass(kw_only=True)
class TextEncoderConfig:
    vocab_size: int  # tokenizer vocabulary, padding id 0
    max_length: int = 12  # tokens per caption
    dim: int = 128  # Dc
    depth: int = 2  # transformer blocks
    num_heads: int = 4


class TextBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, Lc, Dh)
        o = attention_math(q, k, v, mask)  # padded keys are ignored
        h = h + self.proj(o.transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.norm2(h))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(cfg.max_length, cfg.dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(TextBlock(cfg.dim, cfg.num_heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, Lc, Dc)
        for block in self.blocks:
            h = block(h, mask)
        return self.norm(h)


class TextToImageNet(nn.Module):
    """net(x, time, cond) with cond = {"ids": (B, Lc) int64, "mask": (B, Lc) bool, True = real token}."""

    def __init__(self, dit: DiTConfig, text: TextEncoderConfig):
        super().__init__()
        if dit.cond_dim != text.dim:
            raise ValueError(f"dit.cond_dim ({dit.cond_dim}) must equal text.dim ({text.dim})")
        self.text = TextEncoder(text)
        self.dit = DiT(dit)

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = self.text(cond["ids"], cond["mask"])  # (B, Lc, Dc)
        return self.dit(x, time, {"tokens": tokens, "mask": cond["mask"]})
