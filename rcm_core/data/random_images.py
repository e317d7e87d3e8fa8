"""A synthetic image task for parallel tests and throughput runs: random images with random condition tokens.

No learning signal, only shapes and determinism: every tensor comes from the generator passed in (on its
device), so N ranks holding generators in the same state draw identical batches.
"""

from __future__ import annotations

import torch


class RandomImageTask:
    """x0 (B, C, S, S) ~ N(0, 1) and conditions {"tokens": (B, Lc, Dc)}; the null condition is all zeros."""

    def __init__(self, *, image_size: int, channels: int, cond_len: int, cond_dim: int, device=None):
        self.sample_shape = (channels, image_size, image_size)
        self.cond_shape = (cond_len, cond_dim)
        self.device = torch.device(device or "cpu")

    def sample(self, batch_size: int, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        cond = self.sample_cond(batch_size, generator=generator)
        x0 = torch.randn((batch_size, *self.sample_shape), generator=generator, device=self.device)
        return x0, cond

    def sample_cond(self, batch_size: int, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        tokens = torch.randn((batch_size, *self.cond_shape), generator=generator, device=self.device)
        return {"tokens": tokens}

    def null_cond(self, batch_size: int) -> dict[str, torch.Tensor]:
        return {"tokens": torch.zeros((batch_size, *self.cond_shape), device=self.device)}
