"""Collectives that carry tangents: all-to-all and all-gather as autograd Functions with backward and jvp rules.

PyTorch's functional collectives (`torch.distributed._functional_collectives`) return a ZERO tangent under
forward-mode AD without any error, and `torch.distributed.nn.functional` raises; sCM's JVP must cross the
context-parallel all-to-alls and the output all-gather, so these Functions spell out all three rules
(RUNBOOK, "PyTorch distributed on CPU"). Each is linear in its input, so its jvp is the same collective
applied to the tangent; tests compare the tangents with finite differences.

Both need equal chunks on every rank (callers check divisibility and raise a ValueError naming the sizes).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (deprecated there); the GPU image's torch 2.11 has only the old name
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Chunk j of `x` along scatter_dim goes to rank j; the chunks received are concatenated along gather_dim."""
    world = dist.get_world_size(group)
    send = torch.stack([c.contiguous() for c in x.chunk(world, dim=scatter_dim)])  # (W, ...) row j to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j] came from rank j
    return torch.cat(recv.unbind(0), dim=gather_dim)


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # gloo wants the ranks stacked along dim 0
    _all_gather_single(out, x, group=group)
    return torch.cat(out.view(world, *x.shape).unbind(0), dim=dim)  # rank j's x is chunk j


class _AllToAll(torch.autograd.Function):
    """Linear, so: backward is the inverse all-to-all of the gradient, jvp the same all-to-all of the tangent."""

    @staticmethod
    def forward(x, scatter_dim, gather_dim, group):
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.scatter_dim, ctx.gather_dim, ctx.group = inputs

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.gather_dim, ctx.scatter_dim, ctx.group), None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        return _all_to_all(x_t, ctx.scatter_dim, ctx.gather_dim, ctx.group)


class _AllGather(torch.autograd.Function):
    """Gather along `dim`; the gradient of this rank's shard is its slice of the gathered gradient.

    NOTE: the backward does no communication, by contract: every rank then computes the SAME function of the
    gathered tensor (the rCM losses on the full output), so d loss / d shard is just the shard's slice, and the
    parameter gradients on each rank are the contributions of its own shard (FSDP then sums them; see fsdp.py).
    A reduce-scatter here would count the loss once per rank.
    """

    @staticmethod
    def forward(x, dim, group):
        return _all_gather(x, dim, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.dim, ctx.group = inputs
        ctx.size = x.shape[ctx.dim]

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, rank * ctx.size, ctx.size), None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        return _all_gather(x_t, ctx.dim, ctx.group)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group=None) -> torch.Tensor:
    """Differentiable in both AD modes: split x along scatter_dim across `group`, concatenate along gather_dim.

    E.g. (B, H, L/W, D) with scatter_dim=1, gather_dim=2 -> (B, H/W, L, D): sequence-sharded to head-sharded.
    """
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def all_gather(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Differentiable in both AD modes: concatenate every rank's x along dim (rank order).

    The backward assumes every rank computes the same function of the result (see `_AllGather`).
    """
    if dist.get_world_size(group) == 1:
        return x
    return _AllGather.apply(x, dim, group)


def shard(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """This rank's equal slice of x along dim (no communication; the inverse of `all_gather`)."""
    world = dist.get_world_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"cannot split size {x.shape[dim]} (dim {dim}) evenly across {world} ranks")
    size = x.shape[dim] // world
    return x.narrow(dim, dist.get_rank(group) * size, size)
