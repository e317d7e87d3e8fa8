"""Wan2.1 text-to-video teachers: the project's own forward over a loaded `diffusers.WanTransformer3DModel`.

`WanNet.from_diffusers(model)` adopts the diffusers module's children under the same attribute names (so
`net.state_dict()` has diffusers' keys and a student saves back in the `save_pretrained` layout) and runs its
own forward over them, never the diffusers block or attention-processor code:
* every attention (self and cross) goes through `rcm_core.models.attention.attention` on (B, H, L, Dh): the
  fused Triton forward+JVP kernel on CUDA, the forward-AD-friendly math path on CPU; self-attention through a
  settable `core_attention` per block (Ulysses context parallelism swaps it);
* Wan's 3-D RoPE (interleaved pairs, theta 1e4, head dim split t/h/w = Dh - 4 (Dh//6), 2 (Dh//6), 2 (Dh//6))
  is computed per forward in float64 for the grid at hand, sliced with `shard_sequence` like the tokens, and
  applied without in-place writes (forward-mode AD safe);
* the time path (sinusoid of timestep = 1000 s built from the float64 RF time s, time_embedder, time_proj) runs
  in float32 or wider with autocast off, whatever the weights' dtype, so rCM's finite difference in t is
  resolved (diffusers casts it to the text embedding's dtype, bf16 in its pipeline);
* padded text tokens (mask False) are zeroed and no attention mask is passed, as WanPipeline does.
Sources: diffusers 0.42.1 `models/transformers/transformer_wan.py` and `pipelines/wan/pipeline_wan.py`
(docs/design/diffusers_teachers.md, section 1). Code written for this project.

Precision: "islands" (layer norms, the residual adds, RoPE, modulation) compute in promote(float32, activation
dtype), so float64 tests are float64 end to end. `match_diffusers_precision = True` instead rounds exactly where
diffusers 0.42.1 calls `.float()` (norm inputs, residual stream before the gated adds, the modulation's timestep
projection, the sinusoid, RoPE tables): a float64 net then agrees with the float64 diffusers forward to float64
round-off, which is what the faithfulness test checks. It exists for that test, not for training.
Unsupported: Wan I2V/FLF2V (image_dim, added_kv_proj_dim), Wan2.2 TI2V-5B's per-token timesteps (one timestep
per sample here), Wan2.2 A14B's two experts (a `transformer/` folder holds one; the boundary switch is not here).
Legend: B batch, C latent channels, F x H x W latent frames/height/width, (pt, ph, pw) patch, L = (F/pt)(H/ph)
(W/pw) tokens, D width, H heads, Dh head dim, Lc text tokens, Dt text width.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional as F

from rcm_core.config import ConfigError
from rcm_core.models.attention import attention
from rcm_core.models.linear import Linear, linear
from rcm_core.models.token_net import TokenNet, check_ulysses
from rcm_core.teachers import Family, register_family
from rcm_core.teachers.lora import lora_targets

ROPE_THETA = 10000.0
TIMESTEP_SCALE = 1000.0  # Wan's timestep is 1000 * sigma (WanPipeline feeds scheduler.timesteps)
BACKENDS = ("auto", "math", "fused")


class TimePathLinear(Linear):
    """A linear of the time path: computes in promote(float32, input, weight) with autocast off, returns that.

    Same parameters and state dict as nn.Linear; with bf16 weights the GEMM runs on float32 copies, so a 1e-4
    change of t is not rounded away.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(torch.promote_types(torch.float32, x.dtype), self.weight.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.to(dtype)
            return linear(x.to(dtype), self.weight.to(dtype), bias)


def _as_project_linear(module: nn.Linear, cls: type[nn.Linear] = Linear) -> None:
    # Linear adds no state to nn.Linear: swapping the class keeps weights and keys and gives the one-GEMM JVP
    if type(module) is nn.Linear:
        module.__class__ = cls


def rope_tables(grid: tuple[int, int, int], head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (L, Dh/2) float64: the angle of every token's (t, h, w) position for each rotated pair.

    diffusers builds its tables by the same float64 expressions (get_1d_rotary_pos_embed) and stores them
    repeat-interleaved in float32; these are its even (cos) and odd (sin) columns before that rounding.
    """
    h_dim = 2 * (head_dim // 6)
    t_dim = head_dim - 2 * h_dim
    angles = []
    for axis, (size, dim) in enumerate(zip(grid, (t_dim, h_dim, h_dim), strict=True)):
        freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
        pos = torch.arange(size, device=device)
        a = torch.outer(pos, freqs)  # (size, dim/2)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        angles.append(a.view(shape).expand(*grid, dim // 2))
    a = torch.cat(angles, dim=-1).reshape(-1, head_dim // 2)  # (L, Dh/2), tokens in (t, h, w) order
    return torch.cos(a), torch.sin(a)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (B, L, H, Dh) by the angles of cos/sin (L, Dh/2).

    Computed in promote(float32, x.dtype) and returned in x's dtype (as diffusers does); no in-place writes.
    """
    dtype = torch.promote_types(torch.float32, x.dtype)
    x1, x2 = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, Dh/2) each
    c, s = cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # (L, 1, Dh/2)
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).to(x.dtype)


class WanBlock(nn.Module):
    """One Wan transformer block over the diffusers block's children (norm1, attn1, attn2, norm2, ffn, norm3,
    scale_shift_table): gated self-attention with RoPE, ungated cross-attention to the text, gated FFN, all
    modulated by scale_shift_table + the timestep projection. Three stages, as the DiT's, so selective
    checkpointing keeps the self-attention's output instead of recomputing it."""

    def __init__(self, block: nn.Module, *, attention_backend: str):
        super().__init__()
        for name in ("norm1", "attn1", "attn2", "norm2", "ffn", "norm3"):
            setattr(self, name, getattr(block, name))
        self.scale_shift_table = block.scale_shift_table  # (1, 6, D)
        self.num_heads = block.attn1.heads
        self.attention_backend = attention_backend
        self.match_diffusers_precision = False  # set through WanNet.match_diffusers_precision
        # (q, k, v, key_padding_mask) -> o on (B, H, L, Dh); rcm_core.parallel.context_parallel swaps in Ulysses
        self.attn1.core_attention = functools.partial(attention, backend=attention_backend)

    def island(self, dtype: torch.dtype) -> torch.dtype:
        """Where diffusers computes in float32: float32 to match it bit for bit, else promote(float32, dtype)."""
        return torch.float32 if self.match_diffusers_precision else torch.promote_types(torch.float32, dtype)

    def forward(self, x: torch.Tensor, context: torch.Tensor, time_proj: torch.Tensor, rope) -> torch.Tensor:
        # modulation: 6 x (B, 1, D); part of the time path, >= float32 (diffusers rounds time_proj to float32)
        t = time_proj.float() if self.match_diffusers_precision else time_proj
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.scale_shift_table + t).chunk(6, dim=1)
        q, k, v = self.attention_inputs(x, shift1, scale1, *rope)  # (B, H, L, Dh)
        o = self.attn1.core_attention(q, k, v, None)  # (B, H, L, Dh)
        return self.attention_output_and_mlp(x, o, gate1, context, shift2, scale2, gate2)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(norm, nn.Identity):
            return x
        dtype = self.island(x.dtype)
        weight = None if norm.weight is None else norm.weight.to(dtype)
        bias = None if norm.bias is None else norm.bias.to(dtype)
        return F.layer_norm(x.to(dtype), norm.normalized_shape, weight, bias, norm.eps)

    def _qk_norm(self, norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(torch.float32, x.dtype)  # across all heads (qk_norm "rms_norm_across_heads")
        return F.rms_norm(x.to(dtype), norm.normalized_shape, norm.weight.to(dtype), norm.eps).to(x.dtype)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (self.num_heads, -1))  # (B, L, D) -> (B, L, H, Dh)

    def attention_inputs(self, x, shift, scale, rope_cos, rope_sin):
        """Stage 1: norm, modulation, q/k/v, q/k RMSNorm, RoPE -> q, k, v (B, H, L, Dh)."""
        a = self.attn1
        h = (self._norm(self.norm1, x) * (1 + scale) + shift).to(x.dtype)  # (B, L, D)
        q = self._heads(self._qk_norm(a.norm_q, a.to_q(h)))
        k = self._heads(self._qk_norm(a.norm_k, a.to_k(h)))
        v = self._heads(a.to_v(h))
        q, k = apply_rope(q, rope_cos, rope_sin), apply_rope(k, rope_cos, rope_sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attention_output_and_mlp(self, x, o, gate1, context, shift2, scale2, gate2) -> torch.Tensor:
        """Stage 2: output projection and gated residual, cross-attention, modulated FFN and gated residual."""
        dtype = x.dtype
        isl = self.island(dtype)
        o = self.attn1.to_out[0](o.transpose(1, 2).flatten(2).to(dtype))  # (B, L, D)
        x = (x.to(isl) + o * gate1).to(dtype)
        # cross-attention to the text tokens (no RoPE, no gate, no mask: padded tokens are zero)
        a = self.attn2
        h = self._norm(self.norm2, x).to(dtype)
        q = self._heads(self._qk_norm(a.norm_q, a.to_q(h))).transpose(1, 2)  # (B, H, L, Dh)
        k = self._heads(self._qk_norm(a.norm_k, a.to_k(context))).transpose(1, 2)  # (B, H, Lc, Dh)
        v = self._heads(a.to_v(context)).transpose(1, 2)
        c = attention(q, k, v, None, backend=self.attention_backend)
        x = x + a.to_out[0](c.transpose(1, 2).flatten(2).to(dtype))
        # feed-forward (GELU tanh)
        h = (self._norm(self.norm3, x) * (1 + scale2) + shift2).to(dtype)
        ff = self.ffn.net[2](F.gelu(self.ffn.net[0].proj(h), approximate="tanh"))
        return (x.to(isl) + ff.to(isl) * gate2).to(dtype)


class WanNet(TokenNet):
    """net(x_s (B, C, F, H, W), s (B,) float64 RF time, cond={"tokens": (B, Lc, Dt), "mask": (B, Lc) bool})
    -> the RF velocity eps - x0, shape and dtype of x_s. Build with `WanNet.from_diffusers(model)`."""

    def __init__(self, model: nn.Module, *, attention_backend: str = "auto"):
        super().__init__()
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(BACKENDS)}, got {attention_backend!r}")
        cfg = model.config
        self.diffusers_config = dict(cfg)  # to rebuild a WanTransformer3DModel for save_pretrained
        self.patch_size = tuple(cfg.patch_size)
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.rope_max_seq_len = cfg.rope_max_seq_len
        self.attention_backend = attention_backend
        self._match_diffusers_precision = False
        # adopted children, in diffusers' order (rope has no persistent state: its tables are computed here)
        self.patch_embedding = model.patch_embedding  # Conv3d (D, C, pt, ph, pw), applied as a linear on patches
        self.condition_embedder = model.condition_embedder
        self.blocks = nn.ModuleList(WanBlock(block, attention_backend=attention_backend) for block in model.blocks)
        self.norm_out = model.norm_out
        self.proj_out = model.proj_out
        self.scale_shift_table = model.scale_shift_table  # (1, 2, D)
        ce = self.condition_embedder
        for lin in (ce.time_embedder.linear_1, ce.time_embedder.linear_2, ce.time_proj):
            _as_project_linear(lin, TimePathLinear)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _as_project_linear(m)

    @classmethod
    def from_diffusers(cls, model: nn.Module, *, attention_backend: str = "auto") -> WanNet:
        """The project's net over a loaded diffusers WanTransformer3DModel (T2V); shares its modules and weights.

        NOTE: the adopted nn.Linear modules change class in place (to rcm_core's Linear, time-path ones to
        TimePathLinear): same weights and keys; the diffusers model's own forward still runs, with the time
        projection then computed in float32 or wider.
        """
        check_wan_config(dict(model.config))
        return cls(model, attention_backend=attention_backend)

    def to_diffusers(self, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A diffusers WanTransformer3DModel over this net's weights (same storage, dtypes kept), e.g. to
        `save_pretrained` a student. `state_dict`: full (unsharded) weights, for a net FSDP has sharded (default:
        this net's own)."""
        from rcm_core.teachers import diffusers_module

        state = self.state_dict() if state_dict is None else state_dict
        return diffusers_module(self.diffusers_config, state, WAN21)

    # -- TokenNet (rcm_core.models.token_net) ---------------------------------------------------------
    def self_attentions(self) -> list:
        return [block.attn1 for block in self.blocks]

    def time_path_modules(self) -> list[nn.Module]:
        ce = self.condition_embedder
        return [ce.time_embedder, ce.time_proj]

    def output_modules(self) -> list[nn.Module]:
        return [self.proj_out]

    def check_context_parallel(self, cp_degree: int, num_tokens: int | None = None) -> None:
        check_ulysses(self.num_heads, cp_degree, num_tokens, "(frames/pt) x (height/ph) x (width/pw) after patching")

    @property
    def match_diffusers_precision(self) -> bool:
        """Round to float32 exactly where diffusers 0.42.1 does (see the module docstring); a test switch."""
        return self._match_diffusers_precision

    @match_diffusers_precision.setter
    def match_diffusers_precision(self, value: bool) -> None:
        self._match_diffusers_precision = bool(value)
        for block in self.blocks:
            block.match_diffusers_precision = bool(value)

    def island(self, dtype: torch.dtype) -> torch.dtype:
        """Where diffusers computes in float32: float32 to match it bit for bit, else promote(float32, dtype)."""
        return torch.float32 if self.match_diffusers_precision else torch.promote_types(torch.float32, dtype)

    # -- forward ----------------------------------------------------------------------------------------
    def time_embedding(self, s: torch.Tensor, text_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RF time s (B,) -> temb (B, D) and the timestep projection (B, 6, D), >= float32, autocast off."""
        ce = self.condition_embedder
        timestep = TIMESTEP_SCALE * s.double()  # (B,) float64
        half = ce.timesteps_proj.num_channels // 2
        with torch.autocast(device_type=s.device.type, enabled=False):
            if self.match_diffusers_precision:  # diffusers' get_timestep_embedding, float32 throughout
                freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=s.device) / half)
                args = timestep[:, None].float() * freqs[None, :]
                temb = ce.time_embedder(
                    torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(_dtype(ce.time_embedder))
                )
                temb = temb.to(text_dtype)
            else:
                dtype = torch.promote_types(torch.float32, _dtype(ce.time_proj))
                freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64, device=s.device) / half)
                args = timestep[:, None] * freqs[None, :]  # (B, freq_dim/2) float64
                temb = ce.time_embedder(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype))
            time_proj = ce.time_proj(F.silu(temb))  # (B, 6 D)
        return temb, time_proj.unflatten(1, (6, -1))

    def forward(self, x: torch.Tensor, s: torch.Tensor, cond: dict | None) -> torch.Tensor:
        if cond is None or "tokens" not in cond:
            raise ValueError("WanNet needs text: cond={'tokens': (B, Lc, Dt), 'mask': (B, Lc) bool}")
        b, ch, f, hh, ww = x.shape
        pt, ph, pw = self.patch_size
        grid = (f // pt, hh // ph, ww // pw)
        if f % pt or hh % ph or ww % pw:
            raise ValueError(f"latent (F, H, W) = {(f, hh, ww)} is not divisible by patch_size {self.patch_size}")
        if max(grid) > self.rope_max_seq_len:
            raise ValueError(f"latent grid {grid} exceeds rope_max_seq_len {self.rope_max_seq_len}")
        dtype = self.patch_embedding.weight.dtype  # activations follow the weights (bf16 under mixed precision)
        # patchify: (B, C, F, H, W) -> (B, L, C pt ph pw), tokens in (f, h, w) order as the Conv3d's output
        tokens = x.reshape(b, ch, grid[0], pt, grid[1], ph, grid[2], pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        tokens = self.shard_sequence(tokens.reshape(b, -1, ch * pt * ph * pw), 1)  # (B, L', C pt ph pw)
        pe = self.patch_embedding
        h = linear(tokens.to(dtype), pe.weight.flatten(1), pe.bias)  # (B, L', D); L' = L / cp
        cos, sin = rope_tables(grid, self.head_dim, device=x.device)  # (L, Dh/2) float64
        if self.match_diffusers_precision:
            cos, sin = cos.float(), sin.float()  # diffusers stores its tables in float32
        rope = (self.shard_sequence(cos, 0), self.shard_sequence(sin, 0))  # (L', Dh/2)
        # text: padded tokens zeroed, no mask (WanPipeline); the projection is per token
        text = cond["tokens"]
        if cond.get("mask") is not None:
            text = text * cond["mask"][..., None].to(text.dtype)
        te = self.condition_embedder.text_embedder
        text = text.to(te.linear_1.weight.dtype)
        context = te.linear_2(F.gelu(te.linear_1(text), approximate="tanh")).to(dtype)  # (B, Lc, D)
        temb, time_proj = self.time_embedding(s, text.dtype)  # (B, D), (B, 6, D)
        for block in self.blocks:
            h = block(h, context, time_proj, rope)
        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        isl = self.island(dtype)
        n = self.norm_out
        h = (F.layer_norm(h.to(isl), n.normalized_shape, None, None, n.eps) * (1 + scale) + shift).to(dtype)
        out = self.gather_sequence(self.proj_out(h), 1)  # (B, L, pt ph pw C_out)
        # unpatchify: each token's vector is (pt, ph, pw, C_out), as diffusers' proj_out lays it out
        out = out.reshape(b, *grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, -1, f, hh, ww).to(x.dtype)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def check_wan_config(config: dict) -> None:
    """ConfigError naming the key when a WanTransformer3DModel config.json is not a Wan2.1 text-to-video model."""
    i2v = {k: config.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")}
    if any(v is not None for v in i2v.values()):
        keys = ", ".join(f"{k}={v}" for k, v in i2v.items() if v is not None)
        raise ConfigError(
            f"teacher: config.json sets {keys}: a Wan image-to-video (I2V/FLF2V) transformer; "
            "family wan2.1 supports text-to-video transformers only (image conditioning is unsupported)"
        )
    patch = config.get("patch_size", (1, 2, 2))
    if not isinstance(patch, list | tuple) or len(patch) != 3:
        raise ConfigError(f"teacher: config.json patch_size must be 3 integers (t, h, w), got {str(patch)[:40]}")
    head_dim = config.get("attention_head_dim", 128)
    if not isinstance(head_dim, int) or head_dim % 2:
        raise ConfigError(f"teacher: config.json attention_head_dim must be an even integer, got {str(head_dim)[:20]}")


def _build(model: nn.Module) -> WanNet:
    return WanNet.from_diffusers(model)


WAN21: Family = register_family(
    Family(
        name="wan2.1",
        class_name="WanTransformer3DModel",
        build_net=_build,
        check_config=check_wan_config,
        guidance_to_project=lambda w: float(w),  # WanPipeline: uncond + w (cond - uncond), the project's form
        default_guidance=5.0,  # WanPipeline's default guidance_scale
        lora_targets=lora_targets("ffn"),
        lora_loader="WanLoraLoaderMixin",  # writes transformer.<module>.lora_A/B.weight + peft config
    )
)

__all__ = ["WAN21", "WanBlock", "WanNet", "apply_rope", "check_wan_config", "rope_tables"]
