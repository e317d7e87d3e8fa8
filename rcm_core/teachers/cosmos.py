"""Cosmos-Predict2 (diffusers `CosmosTransformer3DModel`, text-to-image and text-to-video) as a `TokenNet`.

`CosmosNet.from_diffusers(model)` adopts the loaded diffusers module's children under their own names (state-dict
keys unchanged) and runs the project's forward over them: attention through `rcm_core.models.attention` (fused
forward+JVP kernel on CUDA, math path with forward AD on CPU), the time path in >= float32 with autocast off,
RoPE tables computed in float64 and sliced with `shard_sequence` (Ulysses context parallelism), and the
padding-mask channel concatenated as zeros (no torchvision).

Parameterization (diffusers 0.42.1 `Cosmos2TextToImagePipeline.__call__`; docs/design/diffusers_teachers.md
Sec. 2.2): the pipeline feeds `c_in x` with c_in = 1 - t, t = sigma / (sigma + 1), timestep t, and denoises
D = (1 - t) x - t net. With x_s = c_in x that is D = x_s - s net at RF time s = t: the network predicts the RF
velocity eps - x0 at RF time s, with timestep s itself (no factor 1000). So `net(x_s, s, cond)` returns that
velocity, and `FlowModel(net, "rf")` turns it into TrigFlow F (rcm_core.trigflow, float64 coefficients).
CFG: the pipeline's D_c + w (D_c - D_u) is u + g (c - u) with g = 1 + w (the family's `guidance_to_project`).
Text: padded tokens are zeroed (the pipeline zeroes T5 embeddings past each prompt's length) and no attention
mask is passed, as the pipelines do.
fps: Cosmos2TextToImagePipeline passes fps=None (F = 1: the one temporal position is 0 either way);
Cosmos2VideoToWorldPipeline passes fps=16 (its default), which scales temporal RoPE positions by 24 / fps. The
net uses `fps` (default 16.0) for every input, which is the same for images and the Video2World default for video.

Not supported (ConfigError naming the key, `check_config`): Video2World conditioning (in_channels !=
out_channels: the condition-mask channel and per-frame timesteps), ControlNet/Transfer (controlnet_block_every_n),
Predict2.5 image context (img_context_dim_in) and text projection (use_crossattn_projection), and the
Cosmos-1.0 learnable extra position embedding (extra_pos_embed_type).

`match_diffusers_precision=True` reproduces diffusers' float32 islands (float32 timestep sinusoid, float32 RoPE
tables and rotation, float32 RMSNorm variance) so that a float64 net agrees with the float64 diffusers forward to
rounding; the default computes those in promote_types(float32, weight dtype) (float64 end to end in float64 tests,
which JVP-versus-finite-difference checks need).
Legend: B batch, C channels, T/H/W latent frames/height/width, p_t/p_h/p_w patch, L = T'H'W' tokens, D width,
Nh heads, Dh head dim, Lc text tokens, Dc text width.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from rcm_core.config import ConfigError
from rcm_core.models.attention import attention
from rcm_core.models.linear import Linear, linear
from rcm_core.models.token_net import TokenNet, check_ulysses
from rcm_core.teachers import Family, register_family
from rcm_core.teachers.lora import lora_targets

BASE_FPS = 24  # CosmosRotaryPosEmbed's base_fps
DEFAULT_FPS = 16.0  # Cosmos2VideoToWorldPipeline's default


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(torch.float32, dtype)


def _as_project_linear(module: nn.Module) -> None:
    """Every nn.Linear below `module` computes through rcm_core's one-GEMM JVP rule (no new state)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, match: bool) -> torch.Tensor:
    """diffusers RMSNorm; `match` replays its op sequence (float32 variance), else computed in >= float32."""
    if match:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        out = x * torch.rsqrt(variance + eps)
        if weight is None:
            return out.to(x.dtype)
        if weight.dtype in (torch.float16, torch.bfloat16):
            out = out.to(weight.dtype)
        return out * weight
    dtype = _compute_dtype(x.dtype)
    w = None if weight is None else weight.to(dtype)
    return F.rms_norm(x.to(dtype), (x.shape[-1],), w, eps).to(x.dtype)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift in >= float32 (shift, scale (B, D)), returned in x's dtype."""
    dtype = torch.promote_types(_compute_dtype(x.dtype), scale.dtype)
    h = F.layer_norm(x.to(dtype), (x.shape[-1],), eps=1e-6)
    return (h * (1 + scale[:, None].to(dtype)) + shift[:, None].to(dtype)).to(x.dtype)


def timestep_sinusoid(s: torch.Tensor, dim: int, match: bool) -> torch.Tensor:
    """diffusers Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0): [cos(s f_k), sin(s f_k)],
    f_k = 10000^(-k / (dim/2)); float64 from the float64 s, or (match) diffusers' float32 op sequence."""
    half = dim // 2
    dtype = torch.float32 if match else torch.float64
    exponent = -math.log(10000) * torch.arange(half, dtype=dtype, device=s.device)
    freqs = torch.exp(exponent / half)
    args = s.to(dtype)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class CosmosTimeEmbedding(nn.Module):
    """time_embed: s -> (temb (B, 3D), embedded (B, D)); adopts `t_embedder` and `norm` (time path)."""

    def __init__(self, time_embed: nn.Module, match: Callable[[], bool]):
        super().__init__()
        self.t_embedder = time_embed.t_embedder
        self.norm = time_embed.norm
        self._match = match

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.t_embedder
        dtype = _compute_dtype(e.linear_1.weight.dtype)
        with torch.autocast(device_type=s.device.type, enabled=False):
            proj = timestep_sinusoid(s, e.linear_1.in_features, self._match()).to(dtype)  # (B, D)
            temb = linear(F.silu(linear(proj, e.linear_1.weight.to(dtype))), e.linear_2.weight.to(dtype))
            embedded = _rms_norm(proj, self.norm.weight.to(dtype), self.norm.eps, self._match())
        return temb, embedded


class CosmosModulation(nn.Module):
    """An adaLN's time-path half (adopts `linear_1`, `linear_2`): SiLU(embedded) -> linear_1 -> linear_2, plus the
    first n*D of temb; returns n chunks (B, D) in >= float32 (shift, scale[, gate])."""

    def __init__(self, ada: nn.Module, chunks: int):
        super().__init__()
        self.linear_1, self.linear_2, self.chunks = ada.linear_1, ada.linear_2, chunks

    def forward(self, embedded: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype = _compute_dtype(self.linear_1.weight.dtype)
        with torch.autocast(device_type=embedded.device.type, enabled=False):
            h = linear(F.silu(embedded.to(dtype)), self.linear_1.weight.to(dtype))
            h = linear(h, self.linear_2.weight.to(dtype))
            h = h + temb[:, : h.shape[-1]].to(dtype)
        return h.chunk(self.chunks, dim=-1)


class CosmosAttention(nn.Module):
    """diffusers Attention (qk_norm="rms_norm", per head) with the project's forward; adopts to_q/k/v, to_out,
    norm_q/k. `core_attention(q, k, v, key_padding_mask)` is settable (Ulysses swaps it for self-attention)."""

    def __init__(self, attn: nn.Module, backend: str, match: Callable[[], bool]):
        super().__init__()
        self.heads = attn.heads
        self.norm_q, self.norm_k = attn.norm_q, attn.norm_k
        self.to_q, self.to_k, self.to_v, self.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
        self._match = match
        self.core_attention: Callable[..., torch.Tensor] = functools.partial(attention, backend=backend)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(2, (self.heads, -1)).transpose(1, 2)  # (B, Nh, N, Dh)

    def project_qkv(self, x: torch.Tensor, context: torch.Tensor | None = None, rope=None):
        ctx = x if context is None else context
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(ctx)), self._heads(self.to_v(ctx))
        match = self._match()
        q = _rms_norm(q, self.norm_q.weight, self.norm_q.eps, match)
        k = _rms_norm(k, self.norm_k.weight, self.norm_k.eps, match)
        if rope is not None:
            q, k = apply_rope(q, *rope, match), apply_rope(k, *rope, match)
        return q, k, v

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        return self.to_out[0](o.transpose(1, 2).flatten(2, 3))  # (B, N, D); to_out[1] is Dropout(p=0)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.core_attention(*self.project_qkv(x, context), None))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, match: bool) -> torch.Tensor:
    """Rotate-half RoPE (diffusers apply_rotary_emb, use_real_unbind_dim=-2) on (B, Nh, L, Dh), tables (L, Dh)."""
    first, second = x.unflatten(-1, (2, -1)).unbind(-2)
    rotated = torch.cat([-second, first], dim=-1)
    dtype = torch.float32 if match else torch.promote_types(_compute_dtype(x.dtype), cos.dtype)
    return (x.to(dtype) * cos.to(dtype) + rotated.to(dtype) * sin.to(dtype)).to(x.dtype)


class CosmosBlock(nn.Module):
    """CosmosTransformerBlock with the project's forward: three stages, the two token-wise ones checkpointable
    around the self-attention core (rcm_core.parallel.activation_checkpoint), the modulation (time path) outside."""

    def __init__(self, block: nn.Module, backend: str, match: Callable[[], bool]):
        super().__init__()
        # the diffusers block's order, so state_dict() lists the keys as diffusers does
        self.norm1 = CosmosModulation(block.norm1, 3)
        self.attn1 = CosmosAttention(block.attn1, backend, match)
        self.norm2 = CosmosModulation(block.norm2, 3)
        self.attn2 = CosmosAttention(block.attn2, backend, match)
        self.norm3 = CosmosModulation(block.norm3, 3)
        self.ff = block.ff  # FeedForward: net[0] = GELU(proj), net[1] = Dropout(p=0), net[2] = Linear

    def forward(self, x, embedded, temb, rope, context) -> torch.Tensor:
        # NOTE: the modulation linears are FSDP units of their own (float32 under bf16): run them outside the
        # checkpointed stages, so a selective recompute replays exactly the stage's own ops.
        shift1, scale1, gate1 = self.norm1(embedded, temb)  # 3 x (B, D) >= float32
        mod2, mod3 = self.norm2(embedded, temb), self.norm3(embedded, temb)
        q, k, v = self.attention_inputs(x, shift1, scale1, rope)  # (B, Nh, L, Dh)
        o = self.attn1.core_attention(q, k, v, None)  # (B, Nh, L, Dh)
        return self.attention_output_and_mlp(x, o, gate1, *mod2, *mod3, context)

    def attention_inputs(self, x, shift, scale, rope):
        return self.attn1.project_qkv(_modulate(x, shift, scale), None, rope)

    def attention_output_and_mlp(self, x, o, gate1, shift2, scale2, gate2, shift3, scale3, gate3, context):
        x = x + gate1[:, None].to(x.dtype) * self.attn1.project_out(o)  # (B, L, D)
        x = x + gate2[:, None].to(x.dtype) * self.attn2(_modulate(x, shift2, scale2), context)
        h = self.ff.net[2](F.gelu(self.ff.net[0].proj(_modulate(x, shift3, scale3))))
        return x + gate3[:, None].to(x.dtype) * h


class CosmosNet(TokenNet):
    """net(x_s (B, C, T, H, W), s (B,) RF time, cond {"tokens": (B, Lc, Dc), "mask": (B, Lc) bool}) -> eps - x0."""

    def __init__(self, model: nn.Module, *, attention_backend: str = "auto", fps: float | None = DEFAULT_FPS):
        super().__init__()
        check_cosmos_config(dict(model.config))
        cfg = model.config
        self.diffusers_config = dict(cfg)  # to rebuild a CosmosTransformer3DModel for save_pretrained
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.patch_size = tuple(cfg.patch_size)
        self.in_channels, self.out_channels = cfg.in_channels, cfg.out_channels
        self.concat_padding_mask = bool(cfg.concat_padding_mask)
        self.rope_scale = tuple(float(r) for r in cfg.rope_scale)
        self.max_positions = max(size // p for size, p in zip(cfg.max_size, self.patch_size, strict=True))
        self.fps = fps
        self.match_diffusers_precision = False
        match = self._match  # a bound method: the modules read the flag at call time
        # adopt the diffusers children under their own names: the state dict keeps diffusers' keys
        self.patch_embed = model.patch_embed
        self.time_embed = CosmosTimeEmbedding(model.time_embed, match)
        self.transformer_blocks = nn.ModuleList(
            CosmosBlock(b, attention_backend, match) for b in model.transformer_blocks
        )
        self.norm_out = CosmosModulation(model.norm_out, 2)
        self.proj_out = model.proj_out
        _as_project_linear(self)

    @classmethod
    def from_diffusers(cls, model: nn.Module, *, attention_backend: str = "auto", fps: float | None = DEFAULT_FPS):
        """The project's net over a loaded `diffusers.CosmosTransformer3DModel`: it adopts the module's children (its
        weights, not copies; the module is consumed) and turns their nn.Linear into rcm_core's Linear (one-GEMM JVP
        rule, no new state). `fps` scales temporal RoPE positions by 24 / fps (module docstring); None = no scaling."""
        return cls(model, attention_backend=attention_backend, fps=fps)

    def to_diffusers(self, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """A diffusers CosmosTransformer3DModel over this net's weights (same storage, dtypes kept), e.g. to
        `save_pretrained` a student. `state_dict`: full (unsharded) weights, for a net FSDP has sharded (default:
        this net's own)."""
        from rcm_core.teachers import diffusers_module

        state = self.state_dict() if state_dict is None else state_dict
        return diffusers_module(self.diffusers_config, state, FAMILY)

    def _match(self) -> bool:
        return self.match_diffusers_precision

    # -- TokenNet (rcm_core.models.token_net) ---------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer_blocks

    def self_attentions(self) -> list:
        return [block.attn1 for block in self.transformer_blocks]

    def time_path_modules(self) -> list[nn.Module]:
        mods = [m for b in self.transformer_blocks for m in (b.norm1, b.norm2, b.norm3)]
        return [self.time_embed, *mods, self.norm_out]

    def output_modules(self) -> list[nn.Module]:
        return [self.proj_out]

    def check_context_parallel(self, cp_degree: int, num_tokens: int | None = None) -> None:
        check_ulysses(self.num_heads, cp_degree, num_tokens, "latent frames x height x width / patch_size")

    # -- forward ------------------------------------------------------------------------------------------
    def rope_tables(self, sizes: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """CosmosRotaryPosEmbed: (cos, sin) of shape (L, Dh), axes t, h, w with NTK-scaled bases; float64, or
        float32 in diffusers' op order when matching its precision."""
        dtype = torch.float32 if self.match_diffusers_precision else torch.float64
        dim_h = dim_w = self.head_dim // 6 * 2
        dim_t = self.head_dim - dim_h - dim_w
        seq = torch.arange(self.max_positions, device=device, dtype=dtype)
        embs = []
        for axis, (dim, n) in enumerate(zip((dim_t, dim_h, dim_w), sizes, strict=True)):
            theta = 10000.0 * self.rope_scale[axis] ** (dim / (dim - 2))  # NTK-aware base
            freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=dtype)[: dim // 2] / dim))
            pos = seq[:n] if axis or self.fps is None else seq[:n] / self.fps * BASE_FPS
            embs.append(torch.outer(pos, freqs))
        t, h, w = sizes
        grid = [
            embs[0][:, None, None, :].repeat(1, h, w, 1),
            embs[1][None, :, None, :].repeat(t, 1, w, 1),
            embs[2][None, None, :, :].repeat(t, h, 1, 1),
        ]
        freqs = torch.cat(grid * 2, dim=-1).flatten(0, 2)  # (L, Dh)
        return torch.cos(freqs), torch.sin(freqs)

    def forward(self, x: torch.Tensor, s: torch.Tensor, cond: dict | None) -> torch.Tensor:
        if cond is None:
            raise ValueError("CosmosNet needs a text condition {'tokens': (B, L, D_text), 'mask': (B, L)}")
        b, c, frames, height, width = x.shape
        pt, ph, pw = self.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(
                f"latent (T, H, W) = {(frames, height, width)} is not divisible by patch_size {(pt, ph, pw)}"
            )
        sizes = (frames // pt, height // ph, width // pw)
        if max(sizes) > self.max_positions:
            raise ValueError(f"latent grid {sizes} exceeds the config's max_size ({self.max_positions} positions)")
        dtype = self.patch_embed.proj.weight.dtype
        h = x.to(dtype)
        if self.concat_padding_mask:  # the pipelines' padding mask is all zeros: a zero channel, no torchvision
            h = torch.cat([h, h.new_zeros(b, 1, frames, height, width)], dim=1)
        tokens = h.reshape(b, h.shape[1], sizes[0], pt, sizes[1], ph, sizes[2], pw)
        tokens = tokens.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)  # (B, L, (C+1) pt ph pw)
        h = self.patch_embed.proj(self.shard_sequence(tokens, 1))  # (B, L', D); L' = L / cp under CP
        table_dtype = torch.float32 if self.match_diffusers_precision else _compute_dtype(dtype)
        cos, sin = (table.to(table_dtype) for table in self.rope_tables(sizes, x.device))
        rope = (self.shard_sequence(cos, 0), self.shard_sequence(sin, 0))  # (L', Dh) each
        temb, embedded = self.time_embed(s)  # (B, 3D), (B, D) >= float32
        context = cond["tokens"]
        if cond.get("mask") is not None:  # padded text tokens are zero vectors, as the pipelines pass them
            context = context * cond["mask"][..., None].to(context.dtype)
        context = context.to(dtype)  # (B, Lc, Dc)
        for block in self.transformer_blocks:
            h = block(h, embedded, temb, rope, context)
        shift, scale = self.norm_out(embedded, temb)
        out = self.gather_sequence(self.proj_out(_modulate(h, shift, scale)), 1)  # (B, L, ph pw pt C_out)
        # diffusers' unpatchify: channels innermost after (p_h, p_w, p_t), not the patchify order
        out = out.unflatten(2, (ph, pw, pt, -1)).unflatten(1, sizes)  # (B, T', H', W', ph, pw, pt, C)
        out = out.permute(0, 7, 1, 6, 2, 4, 3, 5).reshape(b, self.out_channels, frames, height, width)
        return out.to(x.dtype)


def check_cosmos_config(config: dict) -> None:
    """ConfigError naming the key for a CosmosTransformer3DModel config this family does not run."""
    where = "teacher config.json"
    in_ch, out_ch = config.get("in_channels", 16), config.get("out_channels", 16)
    if in_ch != out_ch:
        raise ConfigError(
            f"{where}: in_channels ({in_ch}) != out_channels ({out_ch}): Cosmos Video2World conditioning "
            "(condition-mask channel, per-frame timesteps) is not supported; text-to-image/video configs only"
        )
    refused = {
        "controlnet_block_every_n": "ControlNet / Cosmos-Transfer blocks",
        "img_context_dim_in": "Cosmos-Predict2.5 image context",
    }
    for key, what in refused.items():
        if config.get(key) is not None:
            raise ConfigError(f"{where}: {key}={config[key]!r} ({what}) is not supported")
    if config.get("use_crossattn_projection", False):
        raise ConfigError(
            f"{where}: use_crossattn_projection=true (Cosmos-Predict2.5 text projection) is not supported"
        )
    extra = config.get("extra_pos_embed_type", "learnable")  # the class default when the key is absent
    if extra is not None:
        raise ConfigError(
            f"{where}: extra_pos_embed_type={extra!r} (Cosmos-1.0 learnable position embedding) is not supported; "
            "Cosmos-Predict2 configs have null"
        )
    head_dim = config.get("attention_head_dim", 128)
    if not isinstance(head_dim, int) or head_dim < 12 or head_dim % 2:
        raise ConfigError(f"{where}: attention_head_dim={head_dim!r} must be an even integer >= 12 (3-axis RoPE)")


FAMILY = register_family(
    Family(
        name="cosmos-predict2",
        class_name="CosmosTransformer3DModel",
        build_net=CosmosNet.from_diffusers,
        check_config=check_cosmos_config,
        guidance_to_project=lambda w: 1 + w,  # D_c + w (D_c - D_u) = u + (1 + w)(c - u)
        default_guidance=7.0,
        lora_targets=lora_targets("ff"),
        lora_loader="CosmosLoraLoaderMixin",  # writes transformer.<module>.lora_A/B.weight + peft config
    )
)

__all__ = ["FAMILY", "CosmosNet", "check_cosmos_config", "timestep_sinusoid"]
