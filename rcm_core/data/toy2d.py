"""2-D mixtures of Gaussians with class labels: the benchmark that shows rCM works in seconds on a CPU.

`ring8`: 8 modes on a circle, classes = 4 pairs of neighbouring modes.
`grid25`: a 5 x 5 grid, classes = its 5 rows.
Both are scaled to about unit variance per axis (sigma_d = 1 in TrigFlow).
"""

from __future__ import annotations

import math

import torch

from rcm_core.config import DataConfig


def mode_layout(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode centres (M, 2) and the class of each mode (M,)."""
    if dataset == "ring8":
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        centres = math.sqrt(2.0) * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # var = r^2/2 = 1
        classes = torch.arange(8) // 2
    elif dataset == "grid25":
        coords = (torch.arange(5, dtype=torch.float64) - 2) / math.sqrt(2.0)  # var = 2 d^2 = 1
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        centres = torch.stack([xx.flatten(), yy.flatten()], dim=1)
        classes = torch.arange(25) // 5
    else:
        raise ValueError(f"unknown toy2d dataset {dataset!r}")
    return centres.float(), classes


class Toy2DTask:
    """Samples (x0, label) pairs; `num_classes` is also the null label used for CFG."""

    def __init__(self, config: DataConfig):
        self.config = config
        self.centres, self.mode_class = mode_layout(config.dataset)
        self.num_classes = int(self.mode_class.max()) + 1
        self.mode_std = config.mode_std
        self.sample_shape = (2,)

    def sample(self, batch_size: int, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-balanced samples: a uniform mode, then Gaussian noise around it."""
        modes = torch.randint(len(self.centres), (batch_size,), generator=generator)
        x0 = self.centres[modes] + self.mode_std * torch.randn(batch_size, 2, generator=generator)
        return x0, self.mode_class[modes]

    def sample_cond(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Labels with the data's class frequencies (every class holds the same number of modes)."""
        return torch.randint(self.num_classes, (batch_size,), generator=generator)

    def null_cond(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), self.num_classes, dtype=torch.long)
