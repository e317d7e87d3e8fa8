"""`TokenNet`: what rcm_core.parallel needs from a transformer to split, checkpoint and shard it.

The DiT and the diffusers teacher families (rcm_core.teachers) implement it. Single-device code: the three
hooks below are identities until rcm_core.parallel installs collectives.

Contract (legend: B batch, L tokens, D width, H heads, Dh head dim):
* `blocks`: an nn.ModuleList of the transformer blocks (units of checkpointing and of FSDP).
* `shard_sequence(x, dim)` / `gather_sequence(x, dim)`: the forward calls `shard_sequence` on the token
  tensor (B, L, D) right after patch embedding and on every per-token table (e.g. RoPE) at its token dim, and
  `gather_sequence` on the per-token output before unpatchify. Context parallelism makes them this rank's
  L/cp tokens and the all-gather; tangents ride along (rcm_core.parallel.collectives).
* `self_attentions()`: one object per block with a settable `core_attention(q, k, v, key_padding_mask) -> o`
  on (B, H, L, Dh) tensors, the only op that mixes tokens; Ulysses replaces it.
* `time_path_modules()`: modules that compute from the time only (time embedding, adaLN modulation linears):
  FSDP gives them float32 units of their own under bf16 mixed precision (rCM's finite difference in t).
* `output_modules()`: modules run last in forward (first in backward), kept gathered by FSDP.
* `check_context_parallel(cp_degree, num_tokens=None)`: ValueError naming the sizes when Ulysses cannot split
  this net cp_degree ways (heads), or a sequence of num_tokens tokens (tokens).
* Selective checkpointing (`activation_checkpointing="selective"`) needs each block to run its self-attention
  core between two methods named in `checkpoint_stages`, with the time-path modules outside both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def whole_sequence(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x


class TokenNet(nn.Module):
    checkpoint_stages: tuple[str, ...] = ("attention_inputs", "attention_output_and_mlp")

    def __init__(self) -> None:
        super().__init__()
        self.shard_sequence: Callable[[torch.Tensor, int], torch.Tensor] = whole_sequence
        self.gather_sequence: Callable[[torch.Tensor, int], torch.Tensor] = whole_sequence

    def self_attentions(self) -> list:
        raise NotImplementedError

    def time_path_modules(self) -> list[nn.Module]:
        return []

    def output_modules(self) -> list[nn.Module]:
        return []

    def check_context_parallel(self, cp_degree: int, num_tokens: int | None = None) -> None:
        raise NotImplementedError


def check_ulysses(num_heads: int, cp_degree: int, num_tokens: int | None, tokens_how: str) -> None:
    """The two Ulysses divisibility rules, with messages naming the sizes (tokens_how: how L is made)."""
    if num_heads % cp_degree:
        raise ValueError(
            f"context parallel: num_heads ({num_heads}) is not divisible by cp_degree ({cp_degree}); "
            "Ulysses gives every rank num_heads / cp_degree whole heads"
        )
    if num_tokens is not None and num_tokens % cp_degree:
        raise ValueError(
            f"context parallel: the {num_tokens} tokens ({tokens_how}) are not divisible by cp_degree ({cp_degree})"
        )


__all__ = ["TokenNet", "check_ulysses", "whole_sequence"]
