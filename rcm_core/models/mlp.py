"""A residual MLP flow network for 2-D benchmarks: net(x, t, cond) with class-label conditioning.

Legend: B batch, D data dim (2), H hidden width. Label `num_classes` is the null label used for CFG.
"""

from __future__ import annotations

import torch
from torch import nn

from rcm_core.config import MLPConfig
from rcm_core.models.embeddings import TimeEmbedding


class ResidualBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h) + c)))


class MLPFlowNet(nn.Module):
    """Predicts the teacher's native output (RF velocity or TrigFlow F) for 2-D points."""

    def __init__(self, config: MLPConfig, *, data_dim: int = 2, num_classes: int = 0, time_dtype=torch.float32):
        super().__init__()
        h = config.hidden_dim
        self.num_classes = num_classes
        self.in_proj = nn.Linear(data_dim, h)
        self.time_embed = TimeEmbedding(h, freq_dim=config.time_embed_dim, time_dtype=time_dtype)
        self.label_embed = nn.Embedding(num_classes + 1, h)  # +1: the null label for CFG
        self.blocks = nn.ModuleList(ResidualBlock(h) for _ in range(config.num_layers))
        self.out_norm = nn.LayerNorm(h)
        self.out_proj = nn.Linear(h, data_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            cond = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        c = self.time_embed(t) + self.label_embed(cond)  # (B, H) float32
        h = self.in_proj(x)  # (B, H)
        for block in self.blocks:
            h = block(h, c)
        return self.out_proj(nn.functional.silu(self.out_norm(h)))  # (B, D)

    def null_cond(self, batch_size: int, device=None) -> torch.Tensor:
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
