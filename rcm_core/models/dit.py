"""A small DiT (Peebles & Xie, arXiv 2212.09748) with adaLN-zero, self-attention and optional
cross-attention to condition tokens; float32 time path (rCM, arXiv 2510.08431, Sec. 4).

Single-device code: no torch.distributed here. Parallelism is applied from outside (rcm_core.parallel) through
three hooks that are identities on one device: `Attention.core_attention` (the self-attention op), and
`DiT.shard_sequence` / `DiT.gather_sequence` (this rank's slice of the tokens, and the inverse).
Linears are `rcm_core.models.linear.Linear` (nn.Linear with a one-GEMM jvp rule: sCM's JVP costs 2 linear passes).
Activations follow the weights' dtype (bf16 under mixed precision); the output has the input's dtype.
Legend: B batch, C channels, Hs x Ws image size, p patch size, L = (Hs/p)(Ws/p) tokens, D model width,
H heads, Lc condition tokens, Dc condition width.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from rcm_core.models.adaln import fused_adaln_enabled, layer_norm_modulate
from rcm_core.models.attention import attention
from rcm_core.models.embeddings import TimeEmbedding
from rcm_core.models.linear import Linear
from rcm_core.models.token_net import TokenNet, check_ulysses


@dataclass(kw_only=True)
class DiTConfig:
    image_size: int = 32  # pixels per side
    in_channels: int = 3  # image channels
    patch_size: int = 2  # pixels per patch side
    dim: int = 384  # model width D
    depth: int = 12  # transformer blocks
    num_heads: int = 6  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / D
    cond_dim: int = 0  # width of condition tokens (0 = no cross-attention)
    qk_norm: bool = True  # RMSNorm on q and k: keeps attention logits bounded in bf16
    attention_backend: str = "auto"  # auto | math | fused

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")


def dit_debug() -> DiTConfig:
    """Tiny preset for tests: 2 blocks, width 64, 8x8 images."""
    return DiTConfig(image_size=8, in_channels=3, patch_size=2, dim=64, depth=2, num_heads=2, cond_dim=32)


def dit_small() -> DiTConfig:
    return DiTConfig(cond_dim=256)


def dit_debug_uncond() -> DiTConfig:
    return replace(dit_debug(), cond_dim=0)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, D) float32 modulation broadcast over tokens.

    A bf16 x is promoted to float32 inside the multiply (the same values as an explicit cast, without writing
    a float32 copy of x first).
    """
    dtype = x.dtype
    if torch.promote_types(dtype, scale.dtype) != scale.dtype:  # e.g. float64 x, float32 modulation
        x = x.to(scale.dtype)
    return (x * (1 + scale[:, None]) + shift[:, None]).to(dtype)


def norm_modulate(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """modulate(norm(x), shift, scale); one fused op with RCM_FUSED_ADALN set (rcm_core.models.adaln)."""
    if fused_adaln_enabled():
        return layer_norm_modulate(norm, x, shift, scale)
    return modulate(norm(x), shift, scale)


def norm_in_float32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(x) (LayerNorm, RMSNorm or Identity) computed in at least float32, returned in x's dtype.

    NOTE: forward-mode AD through a bf16 LayerNorm on CUDA gives a float32 tangent (its saved statistics are
    float32; seen with torch 2.11), which the next bf16 matmul rejects. Casting back from float32 casts the
    tangent too. In float32 and float64 this is exactly norm(x).
    """
    if isinstance(norm, nn.Identity):
        return x
    dtype = torch.promote_types(x.dtype, torch.float32)
    weight = None if norm.weight is None else norm.weight.to(dtype)
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(x.to(dtype), norm.normalized_shape, weight, norm.eps).to(x.dtype)
    bias = None if norm.bias is None else norm.bias.to(dtype)
    return F.layer_norm(x.to(dtype), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, *, kv_dim: int | None = None, qk_norm: bool, backend: str):
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.q = Linear(dim, dim)
        self.kv = Linear(kv_dim or dim, 2 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim)
        # (q, k, v, key_padding_mask) -> o; rcm_core.parallel.context_parallel swaps in Ulysses for self-attention
        self.core_attention: Callable[..., torch.Tensor] = functools.partial(attention, backend=backend)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, key_padding_mask=None) -> torch.Tensor:
        q, k, v = self.project_qkv(x, context)
        return self.project_out(self.core_attention(q, k, v, key_padding_mask))  # (B, Nq, D)

    def project_qkv(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """(B, Nq, D) queries' and (B, Nk, Dc) keys' tokens -> q (B, H, Nq, Dh), k and v (B, H, Nk, Dh)."""
        b, n, _ = x.shape
        ctx = x if context is None else context
        q = self.q(x).view(b, n, self.num_heads, -1).transpose(1, 2)  # (B, H, Nq, Dh)
        kv = self.kv(ctx.to(self.kv.weight.dtype))  # (B, Nk, 2 D); condition tokens arrive in float32
        k, v = kv.view(b, ctx.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, Nk, Dh)
        return norm_in_float32(self.q_norm, q), norm_in_float32(self.k_norm, k), v

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        b, h, n, dh = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, h * dh))  # (B, Nq, D)


class DiTBlock(nn.Module):
    """adaLN-zero block. The forward is three stages, so that checkpointing can wrap the two token-wise ones
    (`attention_inputs`, `attention_output_and_mlp`) and keep the self-attention's output (and, under
    torch.func.jvp, nothing at all) instead of recomputing it (rcm_core.parallel.activation_checkpoint)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, qk_norm=cfg.qk_norm, backend=cfg.attention_backend)
        self.cross = None
        if cfg.cond_dim:
            self.norm_cross = nn.LayerNorm(d, eps=1e-6)
            self.cross = Attention(
                d, cfg.num_heads, kv_dim=cfg.cond_dim, qk_norm=cfg.qk_norm, backend=cfg.attention_backend
            )
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(Linear(d, hidden), nn.GELU(approximate="tanh"), Linear(hidden, d))
        self.ada = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))  # shift/scale/gate for attention and MLP

    def forward(self, x: torch.Tensor, c: torch.Tensor, context=None, context_mask=None) -> torch.Tensor:
        # Modulation stays float32: it is part of the time path.
        with torch.autocast(device_type=x.device.type, enabled=False):
            shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # 6 x (B, D)
        q, k, v = self.attention_inputs(x, shift1, scale1)  # (B, H, L, Dh)
        o = self.attn.core_attention(q, k, v, None)  # (B, H, L, Dh)
        return self.attention_output_and_mlp(x, o, gate1, shift2, scale2, gate2, context, context_mask)

    def attention_inputs(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        return self.attn.project_qkv(norm_modulate(self.norm1, x, shift, scale))

    def attention_output_and_mlp(self, x, o, gate1, shift2, scale2, gate2, context, context_mask) -> torch.Tensor:
        x = x + gate1[:, None].to(x.dtype) * self.attn.project_out(o)  # (B, L, D)
        if self.cross is not None and context is not None:
            x = x + self.cross(norm_in_float32(self.norm_cross, x), context, context_mask)
        x = x + gate2[:, None].to(x.dtype) * self.mlp(norm_modulate(self.norm2, x, shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))
        self.linear = Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(norm_modulate(self.norm, x, shift, scale))


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (grid*grid, dim)."""
    half = dim // 2
    coords = torch.arange(grid, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half // 2))
    out = []
    for axis in torch.meshgrid(coords, coords, indexing="ij"):
        args = axis.flatten()[:, None] * omega[None]
        out += [torch.sin(args), torch.cos(args)]
    return torch.cat(out, dim=1).float()


class DiT(TokenNet):
    """net(x, time, cond) -> (B, C, Hs, Ws); cond is None or {"tokens": (B, Lc, Dc), "mask": (B, Lc) bool}."""

    def __init__(self, cfg: DiTConfig, *, time_dtype: torch.dtype = torch.float32):
        super().__init__()  # TokenNet: shard_sequence / gather_sequence start as identities
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.dim
        self.grid = cfg.image_size // p
        self.patch_embed = Linear(cfg.in_channels * p * p, d)
        self.register_buffer("pos_embed", sincos_pos_embed(d, self.grid), persistent=False)
        self.time_embed = TimeEmbedding(d, time_dtype=time_dtype)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(d, cfg.in_channels * p * p)
        self.init_weights()

    # -- TokenNet (rcm_core.models.token_net) ---------------------------------------------------------
    def self_attentions(self) -> list:
        return [block.attn for block in self.blocks]

    def time_path_modules(self) -> list[nn.Module]:
        return [self.time_embed, *(block.ada for block in self.blocks), self.final.ada]

    def output_modules(self) -> list[nn.Module]:
        return [self.final]

    def check_context_parallel(self, cp_degree: int, num_tokens: int | None = None) -> None:
        c = self.cfg
        tokens = (c.image_size // c.patch_size) ** 2
        check_ulysses(c.num_heads, cp_degree, tokens, f"(image_size {c.image_size} / patch_size {c.patch_size})^2")

    @torch.no_grad()
    def init_weights(self) -> None:
        self.pos_embed.copy_(sincos_pos_embed(self.cfg.dim, self.grid))  # fixed, but a model built on `meta` has none
        for m in self.modules():  # Xavier-uniform linears with zero bias (DiT)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):  # time MLP: N(0, 0.02) as in DiT
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:  # adaLN-zero: every residual branch starts as the identity
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
            if block.cross is not None:  # cross-attention has no gate: zero its output projection instead
                nn.init.zeros_(block.cross.proj.weight)
        nn.init.zeros_(self.final.ada[-1].weight)  # zero output layer: the untrained net predicts 0
        nn.init.zeros_(self.final.ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def forward(self, x: torch.Tensor, time: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        b, ch, hs, ws = x.shape
        p, g = self.cfg.patch_size, self.grid
        tokens = x.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * p * p)  # (B, L, C p p)
        tokens, pos = self.shard_sequence(tokens, 1), self.shard_sequence(self.pos_embed, 0)  # (B, L', C p p), (L', D)
        h = self.patch_embed(tokens.to(self.patch_embed.weight.dtype))
        h = h + pos.to(h.dtype)  # (B, L', D); L' = L / cp under context parallelism
        c = self.time_embed(time)  # (B, D) float32
        context = cond["tokens"] if cond is not None else None  # (B, Lc, Dc)
        mask = cond.get("mask") if cond is not None else None  # (B, Lc) True = real token
        for block in self.blocks:
            h = block(h, c, context, mask)
        out = self.gather_sequence(self.final(h, c), 1).to(x.dtype)  # (B, L, C p p)
        return out.reshape(b, g, g, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, hs, ws)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["DiT", "DiTConfig", "dit_debug", "dit_small", "num_params"]
