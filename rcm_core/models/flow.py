"""TrigFlow view of any flow network: F(x_t, t, cond), plus classifier-free guidance.

A rectified-flow network (predicting v = eps - x0 at RF time s) is converted by SNR matching
(`rcm_core.trigflow`); a TrigFlow network is used as it is. Students and the fake score are copies of
the teacher's network behind the same wrapper, so distillation never changes the network's inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from rcm_core import trigflow


class FlowModel(nn.Module):
    """Wraps `net(x, time, cond)` as the TrigFlow F-predictor F(x_t, t, cond)."""

    def __init__(self, net: nn.Module, parameterization: str):
        super().__init__()
        if parameterization not in ("rf", "trigflow"):
            raise ValueError(f"parameterization must be 'rf' or 'trigflow', got {parameterization!r}")
        self.net = net
        self.parameterization = parameterization

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        if self.parameterization == "trigflow":
            return self.net(x_t, t, cond)
        # RF teacher: x_s = x_t / (cos t + sin t) at s = sin t / (cos t + sin t); coefficients in float64.
        scale = trigflow.rf_input_scale(t)  # (B,) float64
        x_s = (x_t.double() * trigflow._bcast(scale, x_t)).to(x_t.dtype)
        v = self.net(x_s, trigflow.rf_time_from_trigflow(t), cond)
        return trigflow.f_from_rf_velocity(x_s, v, t)

    def native_loss(self, x0: torch.Tensor, eps: torch.Tensor, time: torch.Tensor, cond=None) -> torch.Tensor:
        """The network's own flow-matching objective at native time `time` (RF s, or TrigFlow t)."""
        if self.parameterization == "rf":
            s = trigflow._bcast(time, x0).to(x0.dtype)
            pred = self.net((1 - s) * x0 + s * eps, time, cond)
            return (pred - (eps - x0)).square().mean()
        pred = self.net(trigflow.add_noise(x0, eps, time), time, cond)
        return (pred - trigflow.target_f(x0, eps, time)).square().mean()


def guided_f(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond, null_cond, guidance_scale: float):
    """Classifier-free guidance F_u + w * (F_c - F_u); one batched call (w = 1 skips the null branch)."""
    if guidance_scale == 1.0 or null_cond is None:
        return model(x_t, t, cond)
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), _cat_cond(cond, null_cond))
    f_cond, f_uncond = both.chunk(2)
    return f_uncond + guidance_scale * (f_cond - f_uncond)


def _cat_cond(cond, null_cond):
    if isinstance(cond, dict):
        return {k: torch.cat([cond[k], null_cond[k]]) for k in cond}
    return torch.cat([cond, null_cond])
