"""EDM2 power-function EMA (Karras et al., arXiv 2312.02696, Sec. 3.1 and Eq. 3).

After the n-th update the average weights past iterates with a power profile, beta_n = (1 - 1/n)^(gamma + 1);
gamma follows from the relative width sigma_rel via sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).
Early in training the average tracks the model closely, later it averages over a fixed fraction of the run.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Invert sigma_rel(gamma) by bisection (sigma_rel is decreasing in gamma on (-1, inf))."""
    if not 0 < sigma_rel < 0.2887:  # sigma_rel(-1) = 1 / sqrt(12)
        raise ValueError(f"sigma_rel must be in (0, 0.2887), got {sigma_rel}")

    def width(gamma: float) -> float:
        return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5

    lo, hi = -1.0 + 1e-12, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if width(mid) > sigma_rel else (lo, mid)
    return 0.5 * (lo + hi)


class PowerFunctionEMA:
    """Keeps an averaged copy of `model`; call `update(model)` after every optimizer step."""

    def __init__(self, model: nn.Module, sigma_rel: float, *, average: nn.Module | None = None):
        """`average` holds the averaged weights (default: a deep copy of `model`); pass an equal copy when the
        model cannot be deep-copied (a sharded FSDP module). Only the parameters `model` trains (requires_grad)
        are averaged and saved: a frozen one (the base weights of a LoRA student) stays as `average` holds it."""
        self.gamma = sigma_rel_to_gamma(sigma_rel)
        self.model = (average if average is not None else copy.deepcopy(model)).requires_grad_(False).eval()
        self.num_updates = 0
        self.trained = [n for n, p in model.named_parameters() if p.requires_grad]
        self.all_trained = len(self.trained) == len(list(model.parameters()))

    def beta(self) -> float:
        n = self.num_updates
        return (1.0 - 1.0 / n) ** (self.gamma + 1) if n > 0 else 0.0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        beta = self.beta()
        averaged, current = list(self.model.parameters()), [p.detach() for p in model.parameters()]
        if len(averaged) != len(current):
            raise ValueError(f"EMA holds {len(averaged)} parameters, the model has {len(current)}")
        if not self.all_trained:
            mine, theirs = dict(self.model.named_parameters()), dict(model.named_parameters())
            averaged, current = [mine[n] for n in self.trained], [theirs[n].detach() for n in self.trained]
        torch._foreach_lerp_(averaged, current, 1.0 - beta)  # one fused launch per dtype/device group
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        weights = self.model.state_dict()
        if not self.all_trained:  # the averaged parameters only; the frozen ones are rebuilt, not restored
            weights = {n: weights[n] for n in self.trained}
        return {"model": weights, "num_updates": self.num_updates, "gamma": self.gamma}

    def load_state_dict(self, state: dict) -> None:
        if self.all_trained:
            self.model.load_state_dict(state["model"])
        else:
            result = self.model.load_state_dict(state["model"], strict=False)
            if result.unexpected_keys or set(self.trained) - set(state["model"]):
                raise ValueError(f"EMA state does not hold the averaged parameters {self.trained[:3]}...")
        self.num_updates = int(state["num_updates"])
        self.gamma = float(state["gamma"])
