"""Ulysses context parallelism for a TokenNet (the DiT, the diffusers families), tangents included
(DeepSpeed-Ulysses, Jacobs et al., arXiv 2309.14509).

The tokens of each sample, (B, L, D), are split along L across the cp ranks from the patch embedding on:
every per-token layer (norms, adaLN modulation, MLP, cross-attention queries) runs on L/cp tokens. Only
self-attention mixes tokens; it turns the shards inside out with two all-to-alls:

    q, k, v (B, H, L/cp, Dh) --all-to-all--> (B, H/cp, L, Dh) --local attention--> o (B, H/cp, L, Dh)
    o --all-to-all--> (B, H, L/cp, Dh)

so each rank attends over the full sequence for H/cp heads (the fused Triton kernel on GPU). The
all-to-alls are `collectives.all_to_all`, which carries tangents: under sCM's torch.func.jvp the tangents
q_t, k_t, v_t and o_t take the same route. Cross-attention stays local: its keys are the condition tokens,
which every rank holds in full. The time embedding and the adaLN modulation are per sample, computed
identically on every cp rank.

The output is gathered before unpatchify (a tangent-carrying all-gather), so the network returns the full
(B, C, Hs, Ws) on every rank and the rCM losses, with their per-sample normalisations over all pixels, run
unchanged. The gather's backward is a slice, so each rank's weight gradients are its tokens' contributions,
which FSDP sums (fsdp.py). The alternative, losses on token shards with cross-rank means, would need every
per-sample norm in the sCM and DMD losses to become an all-reduce.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist

from rcm_core.models.token_net import TokenNet
from rcm_core.parallel.collectives import all_gather, all_to_all, shard


class UlyssesAttention:
    """Self-attention over a sequence sharded across `group`; `local_attention` sees H/cp heads, all tokens."""

    def __init__(self, local_attention: Callable[..., torch.Tensor], group: dist.ProcessGroup):
        self.local_attention = local_attention
        self.group = group

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
        if key_padding_mask is not None:
            raise ValueError("UlyssesAttention is for self-attention over image tokens, which have no padding mask")
        # one all-to-all for q, k and v together (and one for their tangents)
        qkv = all_to_all(torch.stack([q, k, v]), scatter_dim=2, gather_dim=3, group=self.group)  # (3, B, H/cp, L, Dh)
        o = self.local_attention(*qkv.unbind(0), None)  # (B, H/cp, L, Dh)
        return all_to_all(o, scatter_dim=2, gather_dim=1, group=self.group)  # (B, H, L/cp, Dh)


def apply_context_parallel(model: TokenNet, cp_group: dist.ProcessGroup) -> None:
    """Shard the net's tokens across cp_group and route its self-attention through Ulysses (in place).

    Args:
        model: a TokenNet, not yet wrapped by activation checkpointing or FSDP.
        cp_group: the ranks that share each sample.
    """
    model.check_context_parallel(dist.get_world_size(cp_group))
    model.shard_sequence = functools.partial(shard, group=cp_group)
    model.gather_sequence = functools.partial(all_gather, group=cp_group)
    for attn in model.self_attentions():
        attn.core_attention = UlyssesAttention(attn.core_attention, cp_group)
