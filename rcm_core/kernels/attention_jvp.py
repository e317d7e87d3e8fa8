"""Fused FlashAttention forward with its forward-mode derivative (JVP), in Triton.

sCM / rCM (Zheng et al., arXiv 2510.08431) needs d/dt of the network along the probability-flow ODE, i.e. a
JVP through every attention layer. PyTorch's fused attention has no forward-mode AD; its math backend does, at
O(N^2) memory. This module computes, per (batch, head), with s the softmax scale:

    S   = s Q K^T                      P = softmax(S)             O = P V
    S_t = s (Q_t K^T + Q K_t^T)        H = P * S_t  (elementwise)
    O_t = P V_t + H V - diag(rowsum(H)) O

in one pass over K/V with an online softmax (FlashAttention-2, Dao 2023), so no N^2 buffer is ever written.
The running accumulators are unnormalised: acc_o = sum_j p_ij v_j, acc_t = sum_j p_ij vt_j + h_ij v_j,
l = sum_j p_ij, r = sum_j h_ij, all rescaled together when the running row max moves (or, with the fused
kernel's lazy rescale, only when it moves by more than 2^8); at the end
O = acc_o / l and O_t = acc_t / l - (r / l) O. Scores live in log2 units (log2(e) folded into the scale, exp2).

Cost in GEMMs of size (rows x keys x D), per key block:
    fused primal+JVP (`attention_jvp`):  6 = Q K^T, Q_t K^T + Q K_t^T (chained into one accumulator),
                                          P V, P V_t + H V (chained into one accumulator)
    primal only (`attention` forward):   2 = Q K^T, P V                 (also stores the log-sum-exp)
    tangent only (`attention` jvp rule):  5 = Q K^T, two for S_t, P V_t + H V; it reads the saved LSE, so P is
                                          exact from the start (no running max, no rescaling, no O accumulator)
                                          and O for the diag(rowsum(H)) O term is the saved forward output
    backward (`attention` / `attention_jvp` through O): 7 = dK/dV kernel (Q K^T, P^T dO, dO V^T, dS^T Q) +
                                          dQ kernel (Q K^T, dO V^T, dS K); no atomics, deterministic
Tangents given as None (e.g. text K/V in cross-attention, constant along the ODE) drop their GEMMs and loads:
the fused op then costs 4 GEMMs and the tangent-only op 3.

`torch.func.jvp` through a model that calls `attention` runs the primal kernel (2 GEMMs, the with-grad student
forward path too) and then the jvp rule (5 GEMMs, reusing the saved LSE and O): 7 GEMMs instead of the 8 a
naive "rerun the fused kernel" rule costs, and one more than calling `attention_jvp` directly, which is the
fastest path when the caller holds the tangents itself.

Kernel design (H100 numbers and the config sweep: docs/benchmarks.md): one program owns BLOCK_M query rows of
one head (8 warps: each warpgroup 64 rows) and streams K, K_t, V, V_t through shared memory with per-head TMA
descriptors (Hopper; plain masked loads elsewhere or for unaligned tensors); Q and Q_t stay resident. The key
loop runs the whole blocks unmasked and the one block straddling the sequence end masked. Both tangent GEMM
pairs accumulate into one fp32 tile each, so the fused kernel holds two (BLOCK_M, D) accumulators (O, O_t),
not three. The fused kernel issues its three score GEMMs before the softmax and its three accumulating GEMMs
after it, and can rescale its accumulators lazily (only when a row max grows by more than 2^8, as in
FlashAttention-4; an autotune choice). Limit of this design on Hopper, read off the sm_90a SASS: Triton waits
right after each wgmma group whose result the same key block uses, and both warpgroups of a program meet at a
CTA barrier at every TMA refill, so the softmax never overlaps tensor-core work (no FA3-style ping-pong); at
D=64, where exp2 takes a third of the GEMM time, the fused kernel stays near 540 TFLOP/s. Launch configs are
autotuned per head dim, mode and power-of-two length bucket (not exact lengths), so nearby sequence lengths reuse
one tuned, compiled kernel.

On a Hopper GPU the fused, primal and tangent-only ops at head dim 64 and 128 (bf16/fp16, no key-padding mask,
all tangents where tangents are used) run the warp-specialised Gluon kernels in `attention_jvp_sm90.py`
instead (`_sm90_eligible`; measured on an H100 in docs/benchmarks.md); the backward kernels are this module's.

Based on: FlashAttention-2 (Dao 2023, arXiv 2307.08691) for the tiling and online softmax; the Triton fused
attention tutorial for the kernel layout; rCM (arXiv 2510.08431) for the idea of a FlashAttention JVP kernel;
FlashAttention-4 (the CuTe-DSL forward kernel of the flash-attention repository) for the conditional rescale.
Written for this project; the tangent formula is the softmax derivative written out above.

Supported: q, q_t (B, H, Nq, D); k, v, k_t, v_t (B, H, Nk, D); Nq != Nk (cross-attention); any lengths (masked
tails); D in {32, 64, 128, 256}; fp16, bf16, fp32 inputs (fp32 accumulation; fp32 dots run in IEEE precision,
not TF32); last-dim stride 1 (other layouts are copied), any other strides. Optional `kv_seqlens` (B,) int:
keys at positions >= kv_seqlens[b] are padding (right-padded variable-length text) and are skipped, not just
masked; a row with no valid key gives O = O_t = 0.
Known limits: non-causal only; no dropout, no attention bias; no gradient through O_t (no second order), and
the jvp rule refuses to run under an outer functorch transform (vmap, grad of jvp); one scale for all heads;
not a torch.library op, so torch.compile graph-breaks around it; the fused D=128 config sits at the register
limit (140 bytes of spill, outside the key loop, in a Triton 3.6 sm_90a build) and D=256 fused spills heavily
(correct, slow);
launching with TMA sets Triton's global allocator (`triton.set_allocator`, torch-allocated scratch for the
descriptors); first use of a new (head dim, mode, length bucket) autotunes, which compiles 2-3 configs. fp32
inputs on a GPU run IEEE fp32 dots on FMA units with one small pinned config (`_fp32_config`): a correctness
path, slow to compile and to run, built for sm_90 offline but never run on a GPU.
bf16 `tl.dot` is wrong in Triton's CPU interpreter, so CPU tests use fp32/fp16.
"""

import math
import os

import torch
import triton
import triton.language as tl
from torch.autograd import forward_ad

from rcm_core.kernels import attention_jvp_sm90

SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# scores are kept in log2 units so the kernels use exp2; the saved LSE is in natural-log units
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# the fused kernel rescales its accumulators only when a running row max grows by more than this (log2 units)
RESCALE_THRESHOLD = tl.constexpr(8.0)

MODE_PRIMAL = 0  # O and LSE
MODE_FUSED = 1  # O, O_t and LSE in one pass (online softmax)
MODE_TANGENT = 2  # O_t only, from the saved O and LSE


# -- launch configs ------------------------------------------------------------------------------------------------


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int, **kwargs: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, **kwargs}, num_warps=num_warps, num_stages=num_stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, LAZY_RESCALE]) autotune candidates per mode and head dim, for Hopper
# (H100), first entry = fastest in a pinned-config sweep (docs/benchmarks.md; the fused D=32 and D=256 lists were
# not re-timed). LAZY_RESCALE (fused mode only, default False) picks the lazy accumulator rescale of
# `_attn_jvp_fwd_block`: it saves the rescale multiplies but adds a block-wide reduction per key block; the two
# measured within 2% of each other, either way round by shape, so the autotuner times both. The fused mode
# holds two (BLOCK_M, D) fp32 accumulators (O and O_t) plus the S / S_t tiles: with 8 warps each warpgroup owns 64
# query rows, and at D=128 a 64-key block sits at the 255-register limit (140 B of spill outside the key loop in a
# Triton 3.6 sm_90a build, none inside it) yet beats 32-key blocks by 20-25%. 64-row programs (4 warps, two
# programs per SM) were 15-55% slower at D=64 and D=128: each re-reads K/V from L2 for half as many query rows.
# The tangent-only mode holds one accumulator and the primal mode is a plain FlashAttention forward. Shared
# memory (Q, Q_t resident, plus num_stages x (K, K_t, V, V_t) tiles) caps the stage count (fused D=64 128x128
# s3: 224 KiB of the 227 KiB). D=256 fused always spills (two 64x256 fp32 accumulators alone fill the register
# file): correct, not fast.
_FWD_TILES = {
    MODE_PRIMAL: {
        32: [(128, 128, 8, 3), (128, 64, 4, 3)],
        64: [(128, 64, 4, 3), (128, 64, 8, 3)],
        128: [(128, 128, 8, 3), (128, 128, 8, 2)],
        256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
    },
    MODE_FUSED: {
        32: [(128, 64, 8, 3, True), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
        64: [(128, 128, 8, 3, True), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
        128: [(128, 64, 8, 2, True), (128, 64, 8, 2), (128, 32, 8, 3)],
        256: [(64, 32, 8, 2, True), (64, 32, 8, 2), (64, 32, 4, 2)],
    },
    MODE_TANGENT: {
        32: [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        64: [(64, 64, 4, 3), (128, 128, 8, 2)],
        128: [(128, 64, 8, 2), (64, 64, 4, 3)],
        256: [(64, 32, 4, 2), (64, 32, 8, 2)],
    },
}
# Backward: (BLOCK_M query rows, BLOCK_N key rows, num_warps, num_stages), used by both backward kernels;
# checked for correctness on an H100, not timed or tuned.
_BWD_TILES = {
    32: [(64, 128, 8, 3), (64, 64, 4, 3)],
    64: [(64, 128, 8, 3), (64, 64, 4, 3)],
    128: [(64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3)],
    256: [(32, 64, 4, 2), (32, 32, 4, 2)],
}
# One small config for Triton's CPU interpreter: there the cost is per Python-level block op, and 32-key blocks
# make short test sequences exercise several full blocks plus a masked tail.
_INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, LAZY_RESCALE=True)


def _fp32_config(head_dim: int) -> dict:
    """The one config for fp32 inputs on a GPU: IEEE fp32 dots run on FMA units (no tensor cores) and their
    operand tiles are twice as large, so the bf16 tiles overflow shared memory; this is a correctness path."""
    return dict(BLOCK_M=32 if head_dim == 256 else 64, BLOCK_N=32, num_warps=8, num_stages=1)


def _fwd_tile(tile: tuple) -> tuple:
    """A forward tile with its LAZY_RESCALE flag spelled out: (BLOCK_M, BLOCK_N, num_warps, num_stages, lazy)."""
    return tuple(tile) if len(tile) == 5 else (*tile, False)


def _tile_of(c: triton.Config) -> tuple:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs.get("LAZY_RESCALE", False))


_FWD_CONFIGS = [
    _config(*tile[:4], LAZY_RESCALE=tile[4])
    for by_dim in _FWD_TILES.values()
    for tiles in by_dim.values()
    for tile in map(_fwd_tile, tiles)
]
_BWD_CONFIGS = [_config(*tile) for d in _BWD_TILES for tile in _BWD_TILES[d]]


def _unique(configs: list[triton.Config]) -> list[triton.Config]:
    seen, out = set(), []
    for c in configs:
        if _tile_of(c) not in seen:
            seen.add(_tile_of(c))
            out.append(c)
    return out


def _prune_fwd(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    wanted = {_fwd_tile(t) for t in _FWD_TILES[args["MODE"]][args["HEAD_DIM"]]}
    return _unique([c for c in configs if _tile_of(c) in wanted])


def _prune_bwd(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    wanted = {(*t, False) for t in _BWD_TILES[args["HEAD_DIM"]]}
    return _unique([c for c in configs if _tile_of(c) in wanted])


def _length_bucket(n: int) -> int:
    """Autotune key for a sequence length: next power of two, so nearby lengths share one tuned config."""
    return max(16, triton.next_power_of_2(n))


# -- kernels -------------------------------------------------------------------------------------------------------


# fmt: off
@triton.jit
def _load_key_rows(src, start_n, valid_n, MASK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """A (BLOCK_N, HEAD_DIM) tile of key-indexed rows at start_n.

    TMA: `src` is a per-head descriptor; rows past the sequence read as zeros (rows in [kv_len, N_K) are real
    data, made harmless by the -inf scores). Else `src` is a tensor of pointers already at start_n, masked in
    the block that straddles kv_len.
    """
    if USE_TMA:
        return src.load([start_n, 0])
    elif MASK_N:
        return tl.load(src, mask=valid_n[:, None], other=0.0)
    else:
        return tl.load(src)


@triton.jit
def _tangent_scores(q, q_t, k, kt_ptrs, start_n, valid_n, MASK_N: tl.constexpr, HAS_QT: tl.constexpr,
                    HAS_KT: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """s_t / scale = q_t k^T + q k_t^T for one key block, both products chained into one fp32 accumulator."""
    if HAS_QT:
        s_t = tl.dot(q_t, tl.trans(k), input_precision=INPUT_PRECISION)
        if HAS_KT:
            k_t = _load_key_rows(kt_ptrs, start_n, valid_n, MASK_N, USE_TMA)
            s_t = tl.dot(q, tl.trans(k_t), s_t, input_precision=INPUT_PRECISION)
    else:
        k_t = _load_key_rows(kt_ptrs, start_n, valid_n, MASK_N, USE_TMA)
        s_t = tl.dot(q, tl.trans(k_t), input_precision=INPUT_PRECISION)
    return s_t


@triton.jit
def _attn_jvp_fwd_block(
    acc_o, acc_t, m_i, l_i, r_i, q, q_t, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs, start_n, kv_len, offs_n, qk_scale, scale,
    MODE: tl.constexpr, HAS_QT: tl.constexpr, HAS_KT: tl.constexpr, HAS_VT: tl.constexpr, MASK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, LAZY_RESCALE: tl.constexpr,
):
    """One key block of the forward: updates the running (acc_o, acc_t, m_i, l_i, r_i) of BLOCK_M query rows.

    Primal: s = q k^T (raw), p = exp2(s * qk_scale - m) with m a running row max in log2 units,
    acc_o = alpha acc_o + p v, l = alpha l + rowsum(p), alpha = exp2(m_old - m_new).
    Tangent: s_t = scale (q_t k^T + q k_t^T), h = p * s_t, acc_t = alpha acc_t + p v_t + h v,
    r = alpha r + rowsum(h). In MODE 2 (tangent only) m_i holds the final LSE in log2 units: p is already
    normalised and nothing is rescaled. MASK_N marks the one block that straddles kv_len.

    MODE 1 (fused) issues its three score GEMMs before the softmax and its three accumulating GEMMs after it,
    back to back, so all elementwise work of a block sits in one stretch between the two GEMM groups (3-5%
    faster on an H100 than the earlier interleaved order; docs/benchmarks.md). With LAZY_RESCALE it keeps m
    stale while no row max grows by more than RESCALE_THRESHOLD = 8 (log2 units; the FlashAttention-4
    conditional rescale): p <= 2^8 then, harmless in fp32 sums and in bf16/fp16 dot operands, and the O / O_t /
    LSE epilogue is exact for any m. The test costs one block-wide reduction per key block and skips the alpha
    rescale of two (BLOCK_M, HEAD_DIM) fp32 accumulators on almost every block.
    """
    HAS_ST: tl.constexpr = MODE != 0 and (HAS_QT or HAS_KT)
    valid_n = (start_n + offs_n) < kv_len
    k = _load_key_rows(k_ptrs, start_n, valid_n, MASK_N, USE_TMA)
    # -- compute qk (raw q.k; the scale is applied in fp32 below) --
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    if MODE == 1 and HAS_ST:
        s_t = _tangent_scores(q, q_t, k, kt_ptrs, start_n, valid_n, MASK_N, HAS_QT, HAS_KT, INPUT_PRECISION, USE_TMA)
    if MASK_N:
        s = tl.where(valid_n[None, :], s, float("-inf"))
    # -- softmax numerator: exp2, log2(e) folded into qk_scale, fp32 --
    if MODE == 2:
        p = tl.math.exp2(s * qk_scale - m_i[:, None])
    elif MODE == 1:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if LAZY_RESCALE:
            # block-uniform branch, taken on the first block (m = -inf) and when a row max grows by > 2^8
            if tl.max((m_new > m_i + RESCALE_THRESHOLD).to(tl.int32), 0) > 0:
                alpha = tl.math.exp2(m_i - m_new)
                acc_o = acc_o * alpha[:, None]
                acc_t = acc_t * alpha[:, None]
                l_i = l_i * alpha
                r_i = r_i * alpha
                m_i = m_new
        else:
            alpha = tl.math.exp2(m_i - m_new)
            acc_o = acc_o * alpha[:, None]
            acc_t = acc_t * alpha[:, None]
            l_i = l_i * alpha
            r_i = r_i * alpha
            m_i = m_new
        p = tl.math.exp2(s * qk_scale - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    p_lo = p.to(q.dtype)  # the dot operand; s is dead from here, which keeps register pressure down
    if MODE == 2:
        # tangent only (one accumulator): p v_t first, then the score GEMMs, so fewer tiles are live at once
        if HAS_VT:
            v_t = _load_key_rows(vt_ptrs, start_n, valid_n, MASK_N, USE_TMA)
            acc_t = tl.dot(p_lo, v_t, acc_t, input_precision=INPUT_PRECISION)
        if HAS_ST:
            s_t = _tangent_scores(q, q_t, k, kt_ptrs, start_n, valid_n, MASK_N, HAS_QT, HAS_KT, INPUT_PRECISION,
                                  USE_TMA)
        v = _load_key_rows(v_ptrs, start_n, valid_n, MASK_N, USE_TMA)
    # -- h = p * s_t and its row sum, ahead of the accumulating GEMMs --
    if HAS_ST:
        h = p * (s_t * scale)
        r_i = r_i + tl.sum(h, 1)
    # -- acc_o = alpha acc_o + p v; acc_t += p v_t + h v (one fp32 accumulator for both tangent terms) --
    if MODE != 2:
        v = _load_key_rows(v_ptrs, start_n, valid_n, MASK_N, USE_TMA)
    if MODE == 0:
        acc_o = acc_o * alpha[:, None]
    if MODE != 2:
        acc_o = tl.dot(p_lo, v, acc_o, input_precision=INPUT_PRECISION)
    if MODE == 1 and HAS_VT:
        v_t = _load_key_rows(vt_ptrs, start_n, valid_n, MASK_N, USE_TMA)
        acc_t = tl.dot(p_lo, v_t, acc_t, input_precision=INPUT_PRECISION)
    if HAS_ST:
        acc_t = tl.dot(h.to(v.dtype), v, acc_t, input_precision=INPUT_PRECISION)
    return acc_o, acc_t, m_i, l_i, r_i


@triton.jit
def _attn_jvp_fwd_kernel(
    Q, K, V, QT, KT, VT, O, OT, LSE, KV_LENS,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_qtb, stride_qth, stride_qtm, stride_ktb, stride_kth, stride_ktn, stride_vtb, stride_vth, stride_vtn,
    stride_ob, stride_oh, stride_om, stride_otb, stride_oth, stride_otm,
    NUM_HEADS, N_Q, N_K, N_Q_BUCKET, N_K_BUCKET, scale,
    HEAD_DIM: tl.constexpr, MODE: tl.constexpr, HAS_QT: tl.constexpr, HAS_KT: tl.constexpr, HAS_VT: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAZY_RESCALE: tl.constexpr = False,
):
    """Program (pid_m, b*H + h): query rows [pid_m*BLOCK_M, +BLOCK_M) of one head against all its keys.

    MODE 0 (primal): O = softmax(S) V and LSE = logsumexp(S) per row (natural log).
    MODE 1 (fused):  O, LSE and O_t = P V_t + H V - diag(rowsum(H)) O, H = P * S_t, online over key blocks.
    MODE 2 (tangent): O_t only; P = exp(S - LSE) from the saved LSE, O read back for the last term.
    N_Q_BUCKET / N_K_BUCKET are unused in the body: they are the autotune key (lengths rounded up to a power of 2).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // NUM_HEADS
    off_h = pid_bh % NUM_HEADS
    # int64 batch/head offsets: B*H*N*D can pass 2^31 elements
    off_b64 = off_b.to(tl.int64)
    off_h64 = off_h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q

    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.load(KV_LENS + off_b), N_K)
    else:
        kv_len = N_K

    q_ptrs = Q + off_b64 * stride_qb + off_h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    q_t = q
    if MODE != 0:
        if HAS_QT:
            qt_ptrs = QT + off_b64 * stride_qtb + off_h64 * stride_qth + offs_m[:, None] * stride_qtm + offs_d[None, :]
            q_t = tl.load(qt_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + off_b64 * stride_kb + off_h64 * stride_kh
    v_base = V + off_b64 * stride_vb + off_h64 * stride_vh
    kt_base = KT + off_b64 * stride_ktb + off_h64 * stride_kth
    vt_base = VT + off_b64 * stride_vtb + off_h64 * stride_vth
    if USE_TMA:
        # per-head 2D TMA descriptors: no address registers, zero fill past N_K
        k_ptrs = tl.make_tensor_descriptor(k_base, [N_K, HEAD_DIM], [stride_kn, 1], [BLOCK_N, HEAD_DIM])
        v_ptrs = tl.make_tensor_descriptor(v_base, [N_K, HEAD_DIM], [stride_vn, 1], [BLOCK_N, HEAD_DIM])
        kt_ptrs = tl.make_tensor_descriptor(kt_base, [N_K, HEAD_DIM], [stride_ktn, 1], [BLOCK_N, HEAD_DIM])
        vt_ptrs = tl.make_tensor_descriptor(vt_base, [N_K, HEAD_DIM], [stride_vtn, 1], [BLOCK_N, HEAD_DIM])
    else:
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        kt_ptrs = kt_base + offs_n[:, None] * stride_ktn + offs_d[None, :]
        vt_ptrs = vt_base + offs_n[:, None] * stride_vtn + offs_d[None, :]
    lse_ptrs = LSE + pid_bh.to(tl.int64) * N_Q + offs_m

    qk_scale = scale * LOG2E
    acc_o = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    if MODE == 2:
        # saved LSE -> log2 units; padded rows read 0 (finite) and are never stored
        m_i = tl.load(lse_ptrs, mask=row_ok, other=0.0) * LOG2E
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # -- whole key blocks: no masks in the hot loop --
    n_full = (kv_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc_o, acc_t, m_i, l_i, r_i = _attn_jvp_fwd_block(
            acc_o, acc_t, m_i, l_i, r_i, q, q_t, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs, start_n, kv_len, offs_n,
            qk_scale, scale, MODE, HAS_QT, HAS_KT, HAS_VT, False, INPUT_PRECISION, USE_TMA, LAZY_RESCALE,
        )
        if not USE_TMA:
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
            kt_ptrs += BLOCK_N * stride_ktn
            vt_ptrs += BLOCK_N * stride_vtn
    # -- the block that straddles kv_len: masked loads, -inf scores past the end --
    if n_full < kv_len:
        acc_o, acc_t, m_i, l_i, r_i = _attn_jvp_fwd_block(
            acc_o, acc_t, m_i, l_i, r_i, q, q_t, k_ptrs, v_ptrs, kt_ptrs, vt_ptrs, n_full, kv_len, offs_n, qk_scale,
            scale, MODE, HAS_QT, HAS_KT, HAS_VT, True, INPUT_PRECISION, USE_TMA, LAZY_RESCALE,
        )

    # -- epilogue: normalise; rows with no valid key (kv_len == 0) have l == 0 and give O = O_t = 0 --
    o_ptrs = O + off_b64 * stride_ob + off_h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    ot_ptrs = OT + off_b64 * stride_otb + off_h64 * stride_oth + offs_m[:, None] * stride_otm + offs_d[None, :]
    if MODE == 2:
        o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        o_t = acc_t - r_i[:, None] * o
        tl.store(ot_ptrs, o_t.to(OT.dtype.element_ty), mask=row_ok[:, None])
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        inv_l = 1.0 / l_safe
        o = acc_o * inv_l[:, None]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptrs, (m_i + tl.math.log2(l_safe)) * LN2, mask=row_ok)
        if MODE == 1:
            o_t = acc_t * inv_l[:, None] - (r_i * inv_l)[:, None] * o
            tl.store(ot_ptrs, o_t.to(OT.dtype.element_ty), mask=row_ok[:, None])


_attn_jvp_fwd_kernel_tuned = triton.autotune(
    configs=_FWD_CONFIGS,
    key=["HEAD_DIM", "N_Q_BUCKET", "N_K_BUCKET", "MODE", "HAS_QT", "HAS_KT", "HAS_VT", "HAS_KV_LENS", "USE_TMA"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_attn_jvp_fwd_kernel)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, NUM_HEADS, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id (fp32): rowsum(P * dP) of the softmax backward, one value per query row."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // NUM_HEADS).to(tl.int64)
    off_h = (pid_bh % NUM_HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    o = tl.load(
        O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, delta, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KV_LENS, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn, NUM_HEADS, N_Q, N_K, N_Q_BUCKET, N_K_BUCKET, scale,
    HEAD_DIM: tl.constexpr, HAS_KV_LENS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (pid_n, b*H + h): dK, dV of key rows [pid_n*BLOCK_N, +BLOCK_N), looping over all query blocks.

    P^T = exp(s K Q^T - LSE), dV = P^T dO, dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dK = s dS^T Q.
    Query rows past N_Q load as zeros (q = dO = delta = 0), so they add exactly nothing; keys at or past
    kv_len get P = 0, hence dK = dV = 0.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // NUM_HEADS
    off_b64 = off_b.to(tl.int64)
    off_h64 = (pid_bh % NUM_HEADS).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.load(KV_LENS + off_b), N_K)
    else:
        kv_len = N_K
    key_ok = offs_n < kv_len
    k = tl.load(
        K + off_b64 * stride_kb + off_h64 * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
        mask=key_ok[:, None],
        other=0.0,
    )
    v = tl.load(
        V + off_b64 * stride_vb + off_h64 * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
        mask=key_ok[:, None],
        other=0.0,
    )
    q_ptrs = Q + off_b64 * stride_qb + off_h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = DO + off_b64 * stride_dob + off_h64 * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :]
    row_base = pid_bh.to(tl.int64) * N_Q
    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # key blocks entirely in the padding skip the loop and store zeros
    hi = tl.where(pid_n * BLOCK_N < kv_len, N_Q, 0)
    for start_m in range(0, hi, BLOCK_M):
        row_ok = (start_m + offs_m) < N_Q
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(LSE + row_base + start_m + offs_m, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + row_base + start_m + offs_m, mask=row_ok, other=0.0)
        # -- recompute p^T (BLOCK_N, BLOCK_M) from the saved LSE --
        s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
        if HAS_KV_LENS:
            p_t = tl.where(key_ok[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
    dk = dk * scale
    store_ok = (offs_n < N_K)[:, None]
    tl.store(
        DK + off_b64 * stride_dkb + off_h64 * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=store_ok,
    )
    tl.store(
        DV + off_b64 * stride_dvb + off_h64 * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=store_ok,
    )


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_LENS, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    NUM_HEADS, N_Q, N_K, N_Q_BUCKET, N_K_BUCKET, scale,
    HEAD_DIM: tl.constexpr, HAS_KV_LENS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (pid_m, b*H + h): dQ of query rows [pid_m*BLOCK_M, +BLOCK_M), looping over the valid keys.

    P = exp(s Q K^T - LSE), dP = dO V^T, dS = P * (dP - delta), dQ = s dS K.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // NUM_HEADS
    off_b64 = off_b.to(tl.int64)
    off_h64 = (pid_bh % NUM_HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.load(KV_LENS + off_b), N_K)
    else:
        kv_len = N_K
    q = tl.load(
        Q + off_b64 * stride_qb + off_h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + off_b64 * stride_dob + off_h64 * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    row_base = pid_bh.to(tl.int64) * N_Q
    lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + off_b64 * stride_kb + off_h64 * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + off_b64 * stride_vb + off_h64 * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        key_ok = (start_n + offs_n) < kv_len
        k = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        p = tl.where(key_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    dq = dq * scale
    tl.store(
        DQ + off_b64 * stride_dqb + off_h64 * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


_BWD_KEY = ["HEAD_DIM", "N_Q_BUCKET", "N_K_BUCKET", "HAS_KV_LENS"]
_attn_bwd_dkdv_kernel_tuned = triton.autotune(
    configs=_BWD_CONFIGS, key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune_bwd}
)(_attn_bwd_dkdv_kernel)
_attn_bwd_dq_kernel_tuned = triton.autotune(
    configs=_BWD_CONFIGS, key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune_bwd}
)(_attn_bwd_dq_kernel)
# fmt: on


# -- launchers -----------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (uninitialised), so tests can poison it in one place."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"attention_jvp: {msg}")


def _check_inputs(q, k, v, q_t=None, k_t=None, v_t=None, kv_seqlens=None) -> None:
    _check(
        q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
        f"q, k, v must be (B, H, N, D); got {q.shape}, {k.shape}, {v.shape}",
    )
    B, H, _, D = q.shape
    _check(k.shape[:2] == (B, H) and k.shape[3] == D, f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    _check(v.shape == k.shape, f"v {tuple(v.shape)} must have k's shape {tuple(k.shape)} (same head dim)")
    _check(D in SUPPORTED_HEAD_DIMS, f"head dim {D} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    _check(q.dtype in SUPPORTED_DTYPES, f"dtype {q.dtype} is not supported; supported: {SUPPORTED_DTYPES}")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t, p in (("q_t", q_t, q), ("k_t", k_t, k), ("v_t", v_t, v)):
        if t is not None:
            _check(t.shape == p.shape, f"{name} {tuple(t.shape)} must match its primal {tuple(p.shape)}")
            _check(t.dtype == p.dtype, f"{name} dtype {t.dtype} must match its primal's {p.dtype}")
            _check(t.device == p.device, f"{name} is on {t.device}, its primal on {p.device}")
    _check(k.device == q.device and v.device == q.device, "q, k, v must be on one device")
    _check(q.is_cuda or _interpreting(), "tensors must be on a CUDA device (or set TRITON_INTERPRET=1 for CPU)")
    if kv_seqlens is not None:
        _check(kv_seqlens.shape == (B,), f"kv_seqlens must have shape ({B},); got {tuple(kv_seqlens.shape)}")
        _check(not kv_seqlens.is_floating_point(), "kv_seqlens must be an integer tensor")


def _last_dim_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE fp32 dots (PyTorch's default fp32 matmul precision), not TF32
    return "ieee" if dtype == torch.float32 else "tf32"


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides (the per-head bases then stay aligned too)."""
    for t in tensors:
        b = t.element_size()
        if t.data_ptr() % 16 or any((st * b) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # global memory where programs write their on-device TMA descriptors (128 B each)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _sm90_eligible(q, k, v, q_t, k_t, v_t, kv_seqlens, need_tangents: bool = True) -> bool:
    """Whether the call can run the warp-specialised Gluon kernels (`attention_jvp_sm90`): a Hopper GPU,
    bf16/fp16, head dim 64 or 128 (where they measured faster; docs/benchmarks.md), all three tangents (for the
    fused and tangent-only modes), no key-padding mask, TMA-compatible strides. RCM_ATTN_SM90=0 turns them off
    (the Triton kernels then run everywhere)."""
    if os.environ.get("RCM_ATTN_SM90", "1") == "0" or _interpreting() or not q.is_cuda:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in attention_jvp_sm90.SM90_TILES:
        return False
    if need_tangents and (q_t is None or k_t is None or v_t is None):
        return False
    if kv_seqlens is not None or q.shape[2] == 0 or k.shape[2] == 0:
        # (no keys: the Gluon consumers would wait for a first key block that never comes)
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9 or not attention_jvp_sm90.available():
        return False
    return _tma_ok(*(t for t in (q, k, v, q_t, k_t, v_t) if t is not None))


def _launch_fwd(mode, q, k, v, q_t, k_t, v_t, o, scale, kv_seqlens, lse=None, config=None, use_tma=None):
    """Run `_attn_jvp_fwd_kernel` in `mode`; returns (o, o_t, lse) with None for what the mode does not write.

    use_tma: None picks TMA descriptors on Hopper+ (and in the interpreter) when the K/V-side tensors allow.
    All three modes run the Gluon kernels instead where `_sm90_eligible` (and no config or use_tma is forced;
    the tangent-only mode from `attention_jvp_sm90.TANGENT_MIN_KEYS` keys on).
    """
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    q, k, v, q_t, k_t, v_t, o = (_last_dim_contiguous(x) for x in (q, k, v, q_t, k_t, v_t, o))
    if mode != MODE_TANGENT:
        o = _new_output((B, H, N_Q, D), q.dtype, q.device)
        lse = _new_output((B, H, N_Q), torch.float32, q.device)
    o_t = _new_output((B, H, N_Q, D), q.dtype, q.device) if mode != MODE_PRIMAL else o
    forced = config is not None or use_tma is not None
    if not forced and _sm90_eligible(q, k, v, q_t, k_t, v_t, kv_seqlens, need_tangents=mode != MODE_PRIMAL):
        if mode == MODE_PRIMAL:
            attention_jvp_sm90.primal_forward(q, k, v, o, lse, scale)
            return o, None, lse
        if mode == MODE_FUSED:
            return attention_jvp_sm90.fused_forward(q, k, v, q_t, k_t, v_t, o, o_t, lse, scale)
        if N_K >= attention_jvp_sm90.TANGENT_MIN_KEYS:
            return None, attention_jvp_sm90.tangent_forward(q, k, v, q_t, k_t, v_t, o, lse, o_t, scale), None
    kv_lens = kv_seqlens.to(device=q.device, dtype=torch.int32) if kv_seqlens is not None else lse
    # absent tangents are never read (HAS_* = False): their primal stands in as a valid pointer
    qt_arg, kt_arg, vt_arg = (t if t is not None else p for t, p in ((q_t, q), (k_t, k), (v_t, v)))
    tensors = (q, k, v, qt_arg, kt_arg, vt_arg, o, o_t, lse, kv_lens)
    strides = [st for t in (q, k, v, qt_arg, kt_arg, vt_arg, o, o_t) for st in _strides(t)]
    args = (*tensors, *strides, H, N_Q, N_K, _length_bucket(N_Q), _length_bucket(N_K), scale)
    flags = dict(
        HEAD_DIM=D,
        MODE=mode,
        HAS_QT=q_t is not None,
        HAS_KT=k_t is not None,
        HAS_VT=v_t is not None,
        HAS_KV_LENS=kv_seqlens is not None,
        INPUT_PRECISION=_input_precision(q.dtype),
    )
    if use_tma is None:
        capable = _interpreting() or (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9)
        use_tma = capable and _tma_ok(k, v, kt_arg, vt_arg)
    if use_tma and not _interpreting():
        triton.set_allocator(_tma_scratch)
    flags["USE_TMA"] = use_tma
    if config is None:
        config = _INTERPRET_CONFIG if _interpreting() else _fp32_config(D) if q.dtype == torch.float32 else None
    if config is not None:
        grid = (triton.cdiv(N_Q, config["BLOCK_M"]), B * H)
        _attn_jvp_fwd_kernel[grid](*args, **flags, **config)
    else:
        _attn_jvp_fwd_kernel_tuned[lambda meta: (triton.cdiv(N_Q, meta["BLOCK_M"]), B * H)](*args, **flags)
    return (
        o if mode != MODE_TANGENT else None,
        o_t if mode != MODE_PRIMAL else None,
        lse if mode != MODE_TANGENT else None,
    )


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    _check(math.isfinite(scale) and scale > 0, f"scale must be a positive finite number; got {scale}")
    return scale


def attention_jvp_forward(q, k, v, q_t=None, k_t=None, v_t=None, scale=None, kv_seqlens=None):
    """Fused attention forward and JVP in one kernel launch (no autograd).

    Args:
        q, k, v: (B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D); fp16, bf16 or fp32; D in SUPPORTED_HEAD_DIMS.
        q_t, k_t, v_t: tangents, shaped like their primals; None means a zero tangent (its GEMMs are skipped).
        scale: softmax scale; default D**-0.5.
        kv_seqlens: optional (B,) integer tensor of valid key counts (keys past it are padding).

    Returns:
        (o, o_t, lse): o and o_t (B, H, Nq, D) in the input dtype; lse (B, H, Nq) fp32, natural log.
    """
    _check_inputs(q, k, v, q_t, k_t, v_t, kv_seqlens)
    scale = _default_scale(q, scale)
    if q_t is None and k_t is None and v_t is None:
        o, _, lse = _launch_fwd(MODE_PRIMAL, q, k, v, None, None, None, None, scale, kv_seqlens)
        return o, torch.zeros_like(o), lse
    return _launch_fwd(MODE_FUSED, q, k, v, q_t, k_t, v_t, None, scale, kv_seqlens)


def attention_forward(q, k, v, scale=None, kv_seqlens=None):
    """Primal attention (FlashAttention-2 forward). Returns (o, lse), lse fp32 (B, H, Nq), natural log."""
    _check_inputs(q, k, v, kv_seqlens=kv_seqlens)
    o, _, lse = _launch_fwd(MODE_PRIMAL, q, k, v, None, None, None, None, _default_scale(q, scale), kv_seqlens)
    return o, lse


def attention_tangent_forward(q, k, v, o, lse, q_t=None, k_t=None, v_t=None, scale=None, kv_seqlens=None):
    """O_t only, from the saved forward output `o` and `lse` (5 GEMMs per key block, no rescaling)."""
    _check_inputs(q, k, v, q_t, k_t, v_t, kv_seqlens)
    if q_t is None and k_t is None and v_t is None:
        return torch.zeros_like(o)
    scale = _default_scale(q, scale)
    _, o_t, _ = _launch_fwd(MODE_TANGENT, q, k, v, q_t, k_t, v_t, o, scale, kv_seqlens, lse=lse.contiguous())
    return o_t


def attention_backward(do, q, k, v, o, lse, scale=None, kv_seqlens=None, config=None):
    """Gradients (dq, dk, dv) of sum(do * o) for o = attention(q, k, v); uses the saved o and lse."""
    _check_inputs(q, k, v, kv_seqlens=kv_seqlens)
    scale = _default_scale(q, scale)
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    q, k, v, o, do = (_last_dim_contiguous(x) for x in (q, k, v, o, do))
    lse = lse.contiguous()
    delta = _new_output((B, H, N_Q), torch.float32, q.device)
    dq = _new_output(tuple(q.shape), q.dtype, q.device)
    dk = _new_output(tuple(k.shape), k.dtype, k.device)
    dv = _new_output(tuple(v.shape), v.dtype, v.device)
    kv_lens = kv_seqlens.to(device=q.device, dtype=torch.int32) if kv_seqlens is not None else lse
    pre_block = 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(N_Q, pre_block), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, N_Q, HEAD_DIM=D, BLOCK_M=pre_block
    )
    common = (H, N_Q, N_K, _length_bucket(N_Q), _length_bucket(N_K), scale)
    flags = dict(HEAD_DIM=D, HAS_KV_LENS=kv_seqlens is not None, INPUT_PRECISION=_input_precision(q.dtype))
    qkv_strides = [st for t in (q, k, v, do) for st in _strides(t)]
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, kv_lens, *qkv_strides, *_strides(dk), *_strides(dv), *common)
    dq_args = (q, k, v, do, lse, delta, dq, kv_lens, *qkv_strides, *_strides(dq), *common)
    if config is None:
        config = _INTERPRET_CONFIG if _interpreting() else _fp32_config(D) if q.dtype == torch.float32 else None
    if config is not None:
        _attn_bwd_dkdv_kernel[(triton.cdiv(N_K, config["BLOCK_N"]), B * H)](*dkdv_args, **flags, **config)
        _attn_bwd_dq_kernel[(triton.cdiv(N_Q, config["BLOCK_M"]), B * H)](*dq_args, **flags, **config)
    else:
        _attn_bwd_dkdv_kernel_tuned[lambda meta: (triton.cdiv(N_K, meta["BLOCK_N"]), B * H)](*dkdv_args, **flags)
        _attn_bwd_dq_kernel_tuned[lambda meta: (triton.cdiv(N_Q, meta["BLOCK_M"]), B * H)](*dq_args, **flags)
    return dq, dk, dv


# -- autograd ------------------------------------------------------------------------------------------------------


def _unwrap_jvp_level(t: torch.Tensor | None) -> torch.Tensor | None:
    """The plain tensor under one functorch wrapper, for a Triton launch inside the jvp rule.

    The tangent is computed without autograd (sCM uses it as a stop-gradient target), so a jvp nested inside
    another functorch transform (vmap, grad of jvp) cannot be served and is refused.
    """
    if t is None or not torch._C._functorch.is_functorch_wrapped_tensor(t):
        return t
    inner = torch._C._functorch.get_unwrapped(t)
    if torch._C._functorch.is_functorch_wrapped_tensor(inner):
        raise NotImplementedError("attention: the jvp rule does not compose with an outer vmap/grad transform")
    return inner


class AttentionFunction(torch.autograd.Function):
    """softmax(s Q K^T) V with a Triton backward and a Triton jvp rule (functorch style: torch.func.jvp works).

    The forward also returns the LSE (non-differentiable), which setup_context saves for both the backward
    and the jvp rule; the jvp rule then needs no running max and no primal accumulator.
    """

    @staticmethod
    def forward(q, k, v, scale, kv_seqlens):
        return attention_forward(q, k, v, scale, kv_seqlens)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, kv_seqlens = inputs
        o, lse = output
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, o, lse, kv_seqlens)
        ctx.save_for_forward(q, k, v, o, lse, kv_seqlens)

    @staticmethod
    def backward(ctx, grad_o, _grad_lse):
        if grad_o is None:
            return None, None, None, None, None
        q, k, v, o, lse, kv_seqlens = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_o, q, k, v, o, lse, ctx.scale, kv_seqlens)
        return dq, dk, dv, None, None

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t, _scale_t, _kv_seqlens_t):
        # under torch.func.jvp the saved tensors (and maybe the tangents) are functorch wrappers of this level
        q, k, v, o, lse, kv_seqlens, q_t, k_t, v_t = (_unwrap_jvp_level(t) for t in (*ctx.saved_tensors, q_t, k_t, v_t))
        # and new tensors made here would be wrapped too: allocate and launch with functorch switched off
        with torch._C._DisableFuncTorch():
            o_t = attention_tangent_forward(q, k, v, o, lse, q_t, k_t, v_t, ctx.scale, kv_seqlens)
        return o_t, None


class AttentionJVPFunction(torch.autograd.Function):
    """(O, O_t) from the fused kernel; differentiable through O only (O_t is returned detached)."""

    @staticmethod
    def forward(q, k, v, q_t, k_t, v_t, scale, kv_seqlens):
        return attention_jvp_forward(q, k, v, q_t, k_t, v_t, scale, kv_seqlens)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, _, scale, kv_seqlens = inputs
        o, o_t, lse = output
        ctx.scale = scale
        ctx.mark_non_differentiable(o_t, lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, o, lse, kv_seqlens)

    @staticmethod
    def backward(ctx, grad_o, _grad_o_t, _grad_lse):
        if grad_o is None:
            return (None,) * 8
        q, k, v, o, lse, kv_seqlens = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_o, q, k, v, o, lse, ctx.scale, kv_seqlens)
        return dq, dk, dv, None, None, None, None, None


class AttentionDualFunction(torch.autograd.Function):
    """o from the fused forward+JVP kernel, for inputs that already carry forward-mode tangents.

    Called by `attention` with the tangents unpacked from the dual inputs (q_t, k_t, v_t as extra inputs), so
    the forward computes O and O_t in one pass (6 GEMMs per key block instead of 4 + 7 in two launches); the jvp
    rule returns the O_t it kept, as the tangents it is given are those same tensors.
    """

    @staticmethod
    def forward(q, k, v, q_t, k_t, v_t, scale, kv_seqlens):
        return attention_jvp_forward(q, k, v, q_t, k_t, v_t, scale, kv_seqlens)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, _, scale, kv_seqlens = inputs
        o, o_t, lse = output
        ctx.scale = scale
        ctx.mark_non_differentiable(o_t, lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, o, lse, kv_seqlens)
        ctx.save_for_forward(o_t)

    @staticmethod
    def backward(ctx, grad_o, _grad_o_t, _grad_lse):
        return AttentionJVPFunction.backward(ctx, grad_o, _grad_o_t, _grad_lse)

    @staticmethod
    def jvp(ctx, *_tangents):
        (o_t,) = (_unwrap_jvp_level(t) for t in ctx.saved_tensors)
        return o_t, None, None


def _forward_tangents(q, k, v):
    """(q_t, k_t, v_t) when q, k or v is a forward-mode dual tensor (torch.func.jvp, forward_ad), else None."""
    tangents = tuple(forward_ad.unpack_dual(x).tangent for x in (q, k, v))
    return None if all(t is None for t in tangents) else tangents


def attention(q, k, v, scale=None, kv_seqlens=None):
    """Attention output o = softmax(scale q k^T) v, (B, H, Nq, D); differentiable in both AD modes.

    Backward runs the Triton backward kernels. Under forward-mode AD (torch.func.jvp, torch.autograd.forward_ad)
    the inputs' tangents are read off the dual tensors and the fused forward+JVP kernel computes o and its
    tangent in one pass; `RCM_ATTN_FUSED_JVP=0` runs the primal kernel, then the jvp rule's tangent-only kernel
    on the saved LSE and output instead. Args as in `attention_jvp_forward`.
    """
    scale = _default_scale(q, scale)
    tangents = _forward_tangents(q, k, v) if os.environ.get("RCM_ATTN_FUSED_JVP", "1") != "0" else None
    if tangents is not None:
        o, _, _ = AttentionDualFunction.apply(q, k, v, *tangents, scale, kv_seqlens)
        return o
    o, _ = AttentionFunction.apply(q, k, v, scale, kv_seqlens)
    return o


def attention_jvp(q, k, v, q_t=None, k_t=None, v_t=None, scale=None, kv_seqlens=None):
    """(o, o_t): attention and its JVP along (q_t, k_t, v_t) from one fused kernel (6 GEMMs per key block).

    Differentiable through o (loss.backward() works); o_t carries no gradient. Args as in
    `attention_jvp_forward`; None tangents are zeros and skip their work.
    """
    o, o_t, _ = AttentionJVPFunction.apply(q, k, v, q_t, k_t, v_t, _default_scale(q, scale), kv_seqlens)
    return o, o_t


# -- reference -----------------------------------------------------------------------------------------------------


def attention_jvp_ref(q, k, v, q_t=None, k_t=None, v_t=None, scale=None, kv_seqlens=None, upcast=True):
    """Plain PyTorch (o, o_t): the oracle for tests and benchmarks. O(N^2) memory.

    Args:
        upcast: True computes in float64 and returns float64 (the oracle); False computes in the inputs'
            dtype, the same-precision baseline a kernel's error is compared against.
        Others as in `attention_jvp_forward`; None tangents are zeros.
    """
    dtype = torch.float64 if upcast else q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    q_t, k_t, v_t = (torch.zeros_like(p) if t is None else t.to(dtype) for t, p in ((q_t, q), (k_t, k), (v_t, v)))
    s = scale * (q @ k.transpose(-1, -2))
    s_t = scale * (q_t @ k.transpose(-1, -2) + q @ k_t.transpose(-1, -2))
    if kv_seqlens is None:
        p = torch.softmax(s, dim=-1)
    else:
        keep = torch.arange(k.shape[2], device=q.device)[None, :] < kv_seqlens.to(q.device)[:, None]  # (B, Nk)
        keep = keep[:, None, None, :]
        # finfo.min, not -inf, and the product with keep: rows with no valid key give P = 0 (so O = O_t = 0)
        # and autograd stays finite
        p = torch.softmax(s.masked_fill(~keep, torch.finfo(s.dtype).min), dim=-1) * keep
    h = p * s_t
    o = p @ v
    o_t = p @ v_t + h @ v - h.sum(-1, keepdim=True) * o
    return o, o_t
