"""Time embedding with a float32 time path.

The time path (sinusoidal features, their MLP, and the modulation computed from them) runs in float32
with autocast disabled: rCM's semi-continuous tangent takes a finite difference in t with a step of
1e-4, which bf16 (spacing 2^-7 near t = 1) rounds away entirely (rCM, arXiv 2510.08431, Sec. 4,
"high-precision time"). `time_dtype=torch.bfloat16` casts the input t to bf16 before the embedding, as
published code does; it exists so tests can show that failure, never as a training setting.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rcm_core.models.linear import Linear


def sinusoidal_features(t: torch.Tensor, dim: int, *, scale: float = 1000.0, max_period: float = 10000.0):
    """(B,) -> (B, dim): [cos(scale * t * f_k), sin(scale * t * f_k)], f_k geometric in [1/max_period, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
    args = (scale * t)[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """t -> sinusoidal features -> MLP -> (B, dim), float32 with autocast off."""

    def __init__(self, dim: int, *, freq_dim: int = 256, time_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_dtype = time_dtype
        self.mlp = nn.Sequential(Linear(freq_dim, dim), nn.SiLU(), Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            # NOTE: the round trip through time_dtype is the whole point of the bf16 test setting;
            # with float32 it only drops float64 digits below the 1e-4 step's resolution needs.
            compute = torch.promote_types(torch.float32, self.mlp[0].weight.dtype)  # float32, or float64 in tests
            t_hi = t.to(self.time_dtype).to(compute)
            return self.mlp(sinusoidal_features(t_hi, self.freq_dim))  # (B, dim) float32
