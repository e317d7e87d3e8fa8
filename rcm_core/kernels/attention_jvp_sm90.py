"""Warp-specialised Hopper (sm_90) attention kernels in Gluon: fused forward + JVP, tangent-only JVP, primal.

Why a second kernel: the Triton kernel in `attention_jvp.py` cannot overlap its softmax with tensor-core work.
Triton waits for every wgmma group whose result the same key block uses, and the two warpgroups of a program
meet at a CTA barrier at each TMA refill, so the GEMMs and the exp2/FMA stretch of every key block run one
after the other on the whole SM (docs/benchmarks.md reads this off the SASS). Gluon, Triton's lower-level
dialect, exposes asynchronous wgmma with explicit waits, mbarriers and warp specialisation. The fused kernel:

  * one CTA = 128 query rows of one head, three warpgroups: a producer that only issues TMA loads (Q, Q_t
    once; then K, K_t and V, V_t per key block into a ring of STAGES shared-memory slots) and two consumer
    warpgroups of 64 query rows each;
  * slots are handed over with mbarriers ("K/K_t full", "V/V_t full", and "empty", arrived by both
    consumers), so the consumers never meet at a CTA-wide barrier: they drift apart and one consumer's
    softmax runs while the other's GEMMs use the tensor cores;
  * registers are rebalanced with setmaxnreg (producer 24, consumers 240).

Within a consumer every GEMM group is waited for before its result is used (the "sync" variant). Tried and
slower on an H100 (2026-11-26, docs/benchmarks.md): keeping the accumulating GEMMs in flight across the loop
edge (ptxas then serialises every wgmma, warnings C7514/C7515: 39.6 ms instead of 34.2 ms at 32760 tokens),
and FA3-style strict ping-pong between the two consumers enforced with mbarriers (12.5 ms instead of 7.5 ms
at 16384 tokens). At head dim 64 the plain version spilled at 128-key blocks and was no faster than the Triton
kernel (3.10 vs 3.03 ms at 4x32x4096x64); the lazy rescale and the pre-scaled Q below made it 2.72 ms.

The same kernel with TANGENT=True is the tangent-only mode (the jvp rule of `attention`, which
`torch.func.jvp` through the DiT runs): P exact from the saved LSE, no running max, no O accumulator, O_t from
the saved O; 5 GEMMs per key block.

`_primal_fwd_kernel` is the plain FlashAttention forward (O and LSE; 2 GEMMs per key block, 128-key blocks) in
the same producer / two-consumer layout, for `attention` / `attention_forward`.

The maths is that of `_attn_jvp_fwd_block` (MODE 1, eager rescale): S = s Q K^T, S_t = s (Q_t K^T + Q K_t^T),
P = softmax(S), H = P * S_t, O_t = P V_t + H V - diag(rowsum H) O, online softmax in log2 units, LSE stored.

Scope (`attention_jvp._sm90_eligible` decides): CUDA compute capability 9.x, bf16/fp16, head dim 64 or 128, all
three tangents given (fused and tangent-only modes), no key-padding mask, TMA-compatible strides. Everything
else runs the Triton kernels. Gluon is experimental: the module imports it defensively (`available()`), and
bridges two API renames between Triton 3.6 (the GPU image) and 3.9 (CI, which builds the kernels for sm_90a
offline in a test).
"""

from __future__ import annotations

import torch

BLOCK_M_WG = 64  # query rows per consumer warpgroup; a CTA holds two
# (BLOCK_N, STAGES) per head dim; shared memory: Q, Q_t for 128 rows + STAGES x (K, K_t, V, V_t) tiles
# per head dim: (BLOCK_N, STAGES); 2 slots = 160 KiB (D=64) / 192 KiB (D=128) of shared memory
SM90_TILES = {64: (128, 2), 128: (64, 2)}
# The tangent-only mode is used from this many keys on: on an H100 it was 9-10% faster than the Triton tangent
# kernel at 4096-32760 keys but 14% slower in the 32760 x 512 cross-attention case (torch.func.jvp: 1.100 vs
# 0.963 ms); lengths in between were not measured.
TANGENT_MIN_KEYS = 4096
# Per head dim, decided inside the kernel from HEAD_DIM (warp_specialize partitions take no constexpr
# arguments), as measured on an H100 (docs/benchmarks.md):
#   lazy rescale (D=64): rescale O / O_t only when some row max of the warpgroup grows by more than 2^8, as the
#     Triton kernel's LAZY_RESCALE; one warpgroup-wide reduction per key block instead of 2 x 32 multiplies;
#   scaled Q (D=64): each consumer multiplies its Q, Q_t tiles by the softmax scale once, in shared memory, so
#     S and S_t come out scaled and the per-element multiply of S_t goes away. Exact for the default scale
#     1/8; at D=128 (scale 1/sqrt(128)) the extra rounding of Q raised the error from 2.3e-3 to 3.2e-3 for a
#     1-2% gain, so D=128 keeps the plain path.


try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    # the TMA load was renamed after Triton 3.6 (async_copy_global_to_shared -> async_load)
    _tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    # and the thread barrier (thread_barrier -> barrier); inside a partition it syncs that partition's warps
    _warps_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import problem means "not available"
    _IMPORT_ERROR = exc


def available() -> bool:
    """Whether this Triton has the Gluon API the kernel is written against."""
    return _IMPORT_ERROR is None


if _IMPORT_ERROR is None:
    # fmt: off
    @gluon.jit
    def _head_desc(base, stride_b, stride_h, stride_n, off_b, off_h, n, rows: gl.constexpr, head_dim: gl.constexpr,
                   layout: gl.constexpr):
        """A per-head 2-D TMA descriptor over (n, head_dim): zero fill past n, boxes of `rows` rows."""
        return tma.make_tensor_descriptor(base + off_b * stride_b + off_h * stride_h, [n, head_dim], [stride_n, 1],
                                          [rows, head_dim], layout)

    @gluon.jit
    def _init_barriers(q_bar, kk_full, vv_full, kv_empty, STAGES: gl.constexpr):
        """Q barrier and the ring's full/empty barriers ("empty" is released by both consumers)."""
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(kk_full.index(i), count=1)
            mbarrier.init(vv_full.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)
        fence_async_shared()

    @gluon.jit
    def _producer(k_desc, kt_desc, v_desc, vt_desc, q_desc, qt_desc, q_smem, qt_smem, k_smem, kt_smem, v_smem,
                  vt_smem, q_bar, kk_full, vv_full, kv_empty, row0, n_blocks):
        """TMA only: Q/Q_t once, then K, K_t (one barrier) and V, V_t (another) per key block into the ring."""
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        HEAD_DIM: gl.constexpr = k_smem.shape[2]
        TILE_BYTES: gl.constexpr = BLOCK_N * HEAD_DIM * 2
        Q_BYTES: gl.constexpr = 64 * HEAD_DIM * 2
        mbarrier.expect(q_bar, 4 * Q_BYTES)
        _tma_load(q_desc, [row0, 0], q_bar, q_smem.index(0))
        _tma_load(q_desc, [row0 + 64, 0], q_bar, q_smem.index(1))
        _tma_load(qt_desc, [row0, 0], q_bar, qt_smem.index(0))
        _tma_load(qt_desc, [row0 + 64, 0], q_bar, qt_smem.index(1))
        for j in range(n_blocks):
            s = j % STAGES
            # a fresh barrier passes a wait on parity 1 at once: the first STAGES blocks need no release
            mbarrier.wait(kv_empty.index(s), ((j // STAGES) & 1) ^ 1)
            start = j * BLOCK_N
            mbarrier.expect(kk_full.index(s), 2 * TILE_BYTES)
            _tma_load(k_desc, [start, 0], kk_full.index(s), k_smem.index(s))
            _tma_load(kt_desc, [start, 0], kk_full.index(s), kt_smem.index(s))
            mbarrier.expect(vv_full.index(s), 2 * TILE_BYTES)
            _tma_load(v_desc, [start, 0], vv_full.index(s), v_smem.index(s))
            _tma_load(vt_desc, [start, 0], vv_full.index(s), vt_smem.index(s))

    @gluon.jit
    def _scores(q, qt, k_smem, kt_smem, kk_full, s_buf, st_buf, j, STAGES: gl.constexpr):
        """Issue S = Q K^T and S_t/s = Q_t K^T + Q K_t^T for key block j (the caller waits for them).

        s_buf / st_buf are only register homes (use_acc=False): the previous block's dead score tiles, so the
        results land in the registers the loop carries them in instead of being copied."""
        s_idx = j % STAGES
        mbarrier.wait(kk_full.index(s_idx), (j // STAGES) & 1)
        k_tr = k_smem.index(s_idx).permute((1, 0))
        s = warpgroup_mma(q, k_tr, s_buf, use_acc=False, is_async=True)
        st = warpgroup_mma(qt, k_tr, st_buf, use_acc=False, is_async=True)
        st = warpgroup_mma(q, kt_smem.index(s_idx).permute((1, 0)), st, is_async=True)
        return s, st

    @gluon.jit
    def _block(s, st, acc_o, acc_t, m_i, l_i, r_i, v_smem, vt_smem, vv_full, kv_empty, cols, N_K, j, qk_scale,
               scale, row_o: gl.constexpr, p_layout: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
               LAST: gl.constexpr, LAZY_RESCALE: gl.constexpr, SCALED_Q: gl.constexpr):
        """Softmax of key block j (its score GEMMs done) and its three accumulating GEMMs, waited for here.
        Block j-1's ring slot is released first: everything that read it has completed."""
        s_idx = j % STAGES
        if j > 0:
            mbarrier.arrive(kv_empty.index((j - 1) % STAGES), count=1)
        if LAST:
            start = j * BLOCK_N
            s = gl.where((start + cols < N_K)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        if LAZY_RESCALE:
            # warpgroup-uniform: taken on the first block (m = -inf) and when a row max grows by more than 2^8
            if gl.max((m_new > m_i + 8.0).to(gl.int32), 0) > 0:
                alpha = gl.exp2(m_i - m_new)
                l_i = l_i * alpha
                r_i = r_i * alpha
                alpha_o = gl.convert_layout(alpha, row_o)
                acc_o = acc_o * alpha_o[:, None]
                acc_t = acc_t * alpha_o[:, None]
                m_i = m_new
            m_new = m_i
            p = gl.exp2(s * qk_scale - m_i[:, None])
            l_i = l_i + gl.sum(p, 1)
            st = warpgroup_mma_wait(0, deps=[st])
            h = p * st if SCALED_Q else p * (st * scale)
            r_i = r_i + gl.sum(h, 1)
        else:
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s * qk_scale - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, 1)
            st = warpgroup_mma_wait(0, deps=[st])
            h = p * st if SCALED_Q else p * (st * scale)
            r_i = r_i * alpha + gl.sum(h, 1)
            alpha_o = gl.convert_layout(alpha, row_o)
            acc_o = acc_o * alpha_o[:, None]
            acc_t = acc_t * alpha_o[:, None]
        p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        h_op = gl.convert_layout(h.to(v_smem.dtype), p_layout)
        mbarrier.wait(vv_full.index(s_idx), (j // STAGES) & 1)
        v = v_smem.index(s_idx)
        acc_o = warpgroup_mma(p_op, v, acc_o, is_async=True)
        acc_t = warpgroup_mma(p_op, vt_smem.index(s_idx), acc_t, is_async=True)
        acc_t = warpgroup_mma(h_op, v, acc_t, is_async=True)
        acc_o, acc_t = warpgroup_mma_wait(0, deps=[acc_o, acc_t])
        return acc_o, acc_t, m_new, l_i, r_i, s, st

    @gluon.jit
    def _consumer(q_smem, qt_smem, k_smem, kt_smem, v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty,
                  O, OT, LSE, o_base, ot_base, lse_base, stride_om, stride_otm, row0, N_Q, N_K, n_blocks, scale,
                  WG: gl.constexpr):
        """One warpgroup: 64 query rows against all key blocks, then O, O_t and LSE for those rows."""
        BM: gl.constexpr = 64
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        HEAD_DIM: gl.constexpr = k_smem.shape[2]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_smem.dtype
        LAZY_RESCALE: gl.constexpr = HEAD_DIM == 64
        SCALED_Q: gl.constexpr = HEAD_DIM == 64

        q = q_smem.index(WG)
        qt = qt_smem.index(WG)
        qk_scale = 1.4426950408889634 if SCALED_Q else scale * 1.4426950408889634
        m_i = gl.full([BM], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BM], gl.float32, row_s)
        r_i = gl.zeros([BM], gl.float32, row_s)
        acc_o = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        acc_t = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        zero_s = gl.zeros([BM, BLOCK_N], gl.float32, s_layout)
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))

        mbarrier.wait(q_bar, 0)
        if SCALED_Q:
            ld: gl.constexpr = gl.BlockedLayout([1, 8], [256 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])
            q.store((q.load(ld).to(gl.float32) * scale).to(dtype))
            qt.store((qt.load(ld).to(gl.float32) * scale).to(dtype))
            fence_async_shared()  # generic-proxy writes, read next by wgmma (async proxy)
            _warps_barrier()  # the warpgroup's four warps all wrote their part before any wgmma reads it
        # two distinct register homes for S and S_t (one shared zero tile would be copied)
        s, st = _scores(q, qt, k_smem, kt_smem, kk_full, zero_s, zero_s * scale, 0, STAGES)
        s, st = warpgroup_mma_wait(0, deps=[s, st])
        for j in range(n_blocks - 1):
            acc_o, acc_t, m_i, l_i, r_i, s_dead, st_dead = _block(
                s, st, acc_o, acc_t, m_i, l_i, r_i, v_smem, vt_smem, vv_full, kv_empty, cols, N_K, j, qk_scale,
                scale, row_o, p_layout, STAGES, BLOCK_N, False, LAZY_RESCALE, SCALED_Q)
            s, st = _scores(q, qt, k_smem, kt_smem, kk_full, s_dead, st_dead, j + 1, STAGES)
            s, st = warpgroup_mma_wait(0, deps=[s, st])
        # the last block masks the keys past N_K (TMA zero-fills them; their scores become -inf)
        acc_o, acc_t, m_i, l_i, r_i, s_dead, st_dead = _block(
            s, st, acc_o, acc_t, m_i, l_i, r_i, v_smem, vt_smem, vv_full, kv_empty, cols, N_K, n_blocks - 1,
            qk_scale, scale, row_o, p_layout, STAGES, BLOCK_N, True, LAZY_RESCALE, SCALED_Q)
        mbarrier.arrive(kv_empty.index((n_blocks - 1) % STAGES), count=1)

        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        inv_l = 1.0 / l_safe
        rows_s = row0 + WG * BM + gl.arange(0, BM, layout=row_s)
        gl.store(LSE + lse_base + rows_s, (m_i + gl.log2(l_safe)) * 0.6931471805599453, mask=rows_s < N_Q)
        inv_l_o = gl.convert_layout(inv_l, row_o)
        r_o = gl.convert_layout(r_i * inv_l, row_o)
        o = acc_o * inv_l_o[:, None]
        o_t = acc_t * inv_l_o[:, None] - r_o[:, None] * o
        rows = row0 + WG * BM + gl.arange(0, BM, layout=row_o)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ok = (rows < N_Q)[:, None]
        gl.store(O + o_base + rows[:, None] * stride_om + offs_d[None, :], o.to(dtype), mask=ok)
        gl.store(OT + ot_base + rows[:, None] * stride_otm + offs_d[None, :], o_t.to(dtype), mask=ok)

    @gluon.jit
    def _consumer_0(q_smem, qt_smem, k_smem, kt_smem, v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty, O, OT,
                    LSE, o_base, ot_base, lse_base, stride_om, stride_otm, row0, N_Q, N_K, n_blocks, scale):
        _consumer(q_smem, qt_smem, k_smem, kt_smem, v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty, O, OT, LSE,
                  o_base, ot_base, lse_base, stride_om, stride_otm, row0, N_Q, N_K, n_blocks, scale, 0)

    @gluon.jit
    def _consumer_1(q_smem, qt_smem, k_smem, kt_smem, v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty, O, OT,
                    LSE, o_base, ot_base, lse_base, stride_om, stride_otm, row0, N_Q, N_K, n_blocks, scale):
        _consumer(q_smem, qt_smem, k_smem, kt_smem, v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty, O, OT, LSE,
                  o_base, ot_base, lse_base, stride_om, stride_otm, row0, N_Q, N_K, n_blocks, scale, 1)

    @gluon.jit
    def _tangent_block(s, st, acc_t, m_i, r_i, v_smem, vt_smem, vv_full, kv_empty, cols, N_K, j, qk_scale, scale,
                       p_layout: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr, LAST: gl.constexpr,
                       SCALED_Q: gl.constexpr):
        """Tangent-only key block: P is exact from the saved LSE (m_i, log2 units), so no running max, no
        rescale and no O accumulator; acc_t += P V_t + H V (2 GEMMs after the 3 score GEMMs)."""
        s_idx = j % STAGES
        if j > 0:
            mbarrier.arrive(kv_empty.index((j - 1) % STAGES), count=1)
        if LAST:
            start = j * BLOCK_N
            s = gl.where((start + cols < N_K)[None, :], s, float("-inf"))
        p = gl.exp2(s * qk_scale - m_i[:, None])
        h = p * st if SCALED_Q else p * (st * scale)
        r_i = r_i + gl.sum(h, 1)
        p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        h_op = gl.convert_layout(h.to(v_smem.dtype), p_layout)
        mbarrier.wait(vv_full.index(s_idx), (j // STAGES) & 1)
        acc_t = warpgroup_mma(p_op, vt_smem.index(s_idx), acc_t, is_async=True)
        acc_t = warpgroup_mma(h_op, v_smem.index(s_idx), acc_t, is_async=True)
        acc_t = warpgroup_mma_wait(0, deps=[acc_t])
        return acc_t, r_i, s, st

    @gluon.jit
    def _tangent_consumer(q_smem, qt_smem, k_smem, kt_smem, v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty,
                          O, OT, LSE, o_base, ot_base, lse_base, stride_om, stride_otm, row0, N_Q, N_K, n_blocks,
                          scale, WG: gl.constexpr):
        """One warpgroup, tangent only: O_t = P V_t + H V - diag(rowsum H) O from the saved O (read from O)
        and LSE (read from LSE)."""
        BM: gl.constexpr = 64
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        HEAD_DIM: gl.constexpr = k_smem.shape[2]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_smem.dtype
        SCALED_Q: gl.constexpr = HEAD_DIM == 64

        q = q_smem.index(WG)
        qt = qt_smem.index(WG)
        qk_scale = 1.4426950408889634 if SCALED_Q else scale * 1.4426950408889634
        rows_s = row0 + WG * BM + gl.arange(0, BM, layout=row_s)
        # the saved LSE in log2 units; rows past N_Q read 0 (their Q rows are zero-filled, so S = 0) and are
        # never stored
        m_i = gl.load(LSE + lse_base + rows_s, mask=rows_s < N_Q, other=0.0) * 1.4426950408889634
        r_i = gl.zeros([BM], gl.float32, row_s)
        acc_t = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        zero_s = gl.zeros([BM, BLOCK_N], gl.float32, s_layout)
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))

        mbarrier.wait(q_bar, 0)
        if SCALED_Q:
            ld: gl.constexpr = gl.BlockedLayout([1, 8], [256 // HEAD_DIM, HEAD_DIM // 8], [4, 1], [1, 0])
            q.store((q.load(ld).to(gl.float32) * scale).to(dtype))
            qt.store((qt.load(ld).to(gl.float32) * scale).to(dtype))
            fence_async_shared()
            _warps_barrier()
        s, st = _scores(q, qt, k_smem, kt_smem, kk_full, zero_s, zero_s * scale, 0, STAGES)
        s, st = warpgroup_mma_wait(0, deps=[s, st])
        for j in range(n_blocks - 1):
            acc_t, r_i, s_dead, st_dead = _tangent_block(
                s, st, acc_t, m_i, r_i, v_smem, vt_smem, vv_full, kv_empty, cols, N_K, j, qk_scale, scale,
                p_layout, STAGES, BLOCK_N, False, SCALED_Q)
            s, st = _scores(q, qt, k_smem, kt_smem, kk_full, s_dead, st_dead, j + 1, STAGES)
            s, st = warpgroup_mma_wait(0, deps=[s, st])
        acc_t, r_i, s_dead, st_dead = _tangent_block(
            s, st, acc_t, m_i, r_i, v_smem, vt_smem, vv_full, kv_empty, cols, N_K, n_blocks - 1, qk_scale, scale,
            p_layout, STAGES, BLOCK_N, True, SCALED_Q)
        mbarrier.arrive(kv_empty.index((n_blocks - 1) % STAGES), count=1)

        rows = row0 + WG * BM + gl.arange(0, BM, layout=row_o)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ok = (rows < N_Q)[:, None]
        o = gl.load(O + o_base + rows[:, None] * stride_om + offs_d[None, :], mask=ok, other=0.0).to(gl.float32)
        o_t = acc_t - gl.convert_layout(r_i, row_o)[:, None] * o
        gl.store(OT + ot_base + rows[:, None] * stride_otm + offs_d[None, :], o_t.to(dtype), mask=ok)

    @gluon.jit
    def _tangent_consumer_0(q_smem, qt_smem, k_smem, kt_smem, v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty,
                            O, OT, LSE, o_base, ot_base, lse_base, stride_om, stride_otm, row0, N_Q, N_K, n_blocks,
                            scale):
        _tangent_consumer(q_smem, qt_smem, k_smem, kt_smem, v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty, O,
                          OT, LSE, o_base, ot_base, lse_base, stride_om, stride_otm, row0, N_Q, N_K, n_blocks,
                          scale, 0)

    @gluon.jit
    def _tangent_consumer_1(q_smem, qt_smem, k_smem, kt_smem, v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty,
                            O, OT, LSE, o_base, ot_base, lse_base, stride_om, stride_otm, row0, N_Q, N_K, n_blocks,
                            scale):
        _tangent_consumer(q_smem, qt_smem, k_smem, kt_smem, v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty, O,
                          OT, LSE, o_base, ot_base, lse_base, stride_om, stride_otm, row0, N_Q, N_K, n_blocks,
                          scale, 1)

    @gluon.jit
    def _fused_fwd_kernel(
        Q, K, V, QT, KT, VT, O, OT, LSE,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_qtb, stride_qth, stride_qtm, stride_ktb, stride_kth, stride_ktn, stride_vtb, stride_vth, stride_vtn,
        stride_ob, stride_oh, stride_om, stride_otb, stride_oth, stride_otm,
        NUM_HEADS, N_Q, N_K, scale,
        HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, TANGENT: gl.constexpr = False,
    ):
        """TANGENT=False: writes O, O_t, LSE. TANGENT=True: reads O and LSE (the primal's), writes O_t only."""
        BM: gl.constexpr = 64
        dtype: gl.constexpr = Q.dtype.element_ty
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        off_b = (pid_bh // NUM_HEADS).to(gl.int64)
        off_h = (pid_bh % NUM_HEADS).to(gl.int64)
        row0 = pid_m * (2 * BM)

        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_desc = _head_desc(Q, stride_qb, stride_qh, stride_qm, off_b, off_h, N_Q, BM, HEAD_DIM, q_layout)
        qt_desc = _head_desc(QT, stride_qtb, stride_qth, stride_qtm, off_b, off_h, N_Q, BM, HEAD_DIM, q_layout)
        k_desc = _head_desc(K, stride_kb, stride_kh, stride_kn, off_b, off_h, N_K, BLOCK_N, HEAD_DIM, kv_layout)
        kt_desc = _head_desc(KT, stride_ktb, stride_kth, stride_ktn, off_b, off_h, N_K, BLOCK_N, HEAD_DIM, kv_layout)
        v_desc = _head_desc(V, stride_vb, stride_vh, stride_vn, off_b, off_h, N_K, BLOCK_N, HEAD_DIM, kv_layout)
        vt_desc = _head_desc(VT, stride_vtb, stride_vth, stride_vtn, off_b, off_h, N_K, BLOCK_N, HEAD_DIM, kv_layout)

        q_smem = gl.allocate_shared_memory(dtype, [2, BM, HEAD_DIM], q_layout)
        qt_smem = gl.allocate_shared_memory(dtype, [2, BM, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        kt_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        vt_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kk_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        vv_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        _init_barriers(q_bar, kk_full, vv_full, kv_empty, STAGES)

        n_blocks = gl.cdiv(N_K, BLOCK_N)
        lse_base = pid_bh.to(gl.int64) * N_Q
        o_base = off_b * stride_ob + off_h * stride_oh
        ot_base = off_b * stride_otb + off_h * stride_oth
        consumer_args = (q_smem, qt_smem, k_smem, kt_smem, v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty,
                         O, OT, LSE, o_base, ot_base, lse_base, stride_om, stride_otm, row0, N_Q, N_K, n_blocks,
                         scale)
        producer_args = (k_desc, kt_desc, v_desc, vt_desc, q_desc, qt_desc, q_smem, qt_smem, k_smem, kt_smem,
                         v_smem, vt_smem, q_bar, kk_full, vv_full, kv_empty, row0, n_blocks)
        if TANGENT:
            gl.warp_specialize(
                [
                    (_tangent_consumer_0, consumer_args),
                    (_tangent_consumer_1, consumer_args),
                    (_producer, producer_args),
                ],
                [4, 4],
                [240, 24],
            )
        else:
            gl.warp_specialize(
                [(_consumer_0, consumer_args), (_consumer_1, consumer_args), (_producer, producer_args)],
                [4, 4],
                [240, 24],
            )

    # -- primal only (O and LSE): the plain FlashAttention forward in the same producer/consumer layout ------------

    @gluon.jit
    def _primal_producer(k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bar, kk_full, vv_full, kv_empty, row0,
                         n_blocks):
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        HEAD_DIM: gl.constexpr = k_smem.shape[2]
        TILE_BYTES: gl.constexpr = BLOCK_N * HEAD_DIM * 2
        mbarrier.expect(q_bar, 2 * 64 * HEAD_DIM * 2)
        _tma_load(q_desc, [row0, 0], q_bar, q_smem.index(0))
        _tma_load(q_desc, [row0 + 64, 0], q_bar, q_smem.index(1))
        for j in range(n_blocks):
            s = j % STAGES
            mbarrier.wait(kv_empty.index(s), ((j // STAGES) & 1) ^ 1)
            start = j * BLOCK_N
            mbarrier.expect(kk_full.index(s), TILE_BYTES)
            _tma_load(k_desc, [start, 0], kk_full.index(s), k_smem.index(s))
            mbarrier.expect(vv_full.index(s), TILE_BYTES)
            _tma_load(v_desc, [start, 0], vv_full.index(s), v_smem.index(s))

    @gluon.jit
    def _primal_score(q, k_smem, kk_full, s_buf, j, STAGES: gl.constexpr):
        s_idx = j % STAGES
        mbarrier.wait(kk_full.index(s_idx), (j // STAGES) & 1)
        s = warpgroup_mma(q, k_smem.index(s_idx).permute((1, 0)), s_buf, use_acc=False, is_async=True)
        return warpgroup_mma_wait(0, deps=[s])

    @gluon.jit
    def _primal_block(s, acc_o, m_i, l_i, v_smem, vv_full, kv_empty, cols, N_K, j, qk_scale,
                      row_o: gl.constexpr, p_layout: gl.constexpr, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                      LAST: gl.constexpr):
        s_idx = j % STAGES
        if j > 0:
            mbarrier.arrive(kv_empty.index((j - 1) % STAGES), count=1)
        if LAST:
            start = j * BLOCK_N
            s = gl.where((start + cols < N_K)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        acc_o = acc_o * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p.to(v_smem.dtype), p_layout)
        mbarrier.wait(vv_full.index(s_idx), (j // STAGES) & 1)
        acc_o = warpgroup_mma(p_op, v_smem.index(s_idx), acc_o, is_async=True)
        acc_o = warpgroup_mma_wait(0, deps=[acc_o])
        return acc_o, m_new, l_i, s

    @gluon.jit
    def _primal_consumer(q_smem, k_smem, v_smem, q_bar, kk_full, vv_full, kv_empty, O, LSE, o_base, lse_base,
                         stride_om, row0, N_Q, N_K, n_blocks, scale, WG: gl.constexpr):
        BM: gl.constexpr = 64
        STAGES: gl.constexpr = k_smem.shape[0]
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        HEAD_DIM: gl.constexpr = k_smem.shape[2]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_smem.dtype

        q = q_smem.index(WG)
        qk_scale = scale * 1.4426950408889634
        m_i = gl.full([BM], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BM], gl.float32, row_s)
        acc_o = gl.zeros([BM, HEAD_DIM], gl.float32, o_layout)
        zero_s = gl.zeros([BM, BLOCK_N], gl.float32, s_layout)
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        mbarrier.wait(q_bar, 0)
        s = _primal_score(q, k_smem, kk_full, zero_s, 0, STAGES)
        for j in range(n_blocks - 1):
            acc_o, m_i, l_i, s_dead = _primal_block(s, acc_o, m_i, l_i, v_smem, vv_full, kv_empty, cols, N_K, j,
                                                    qk_scale, row_o, p_layout, STAGES, BLOCK_N, False)
            s = _primal_score(q, k_smem, kk_full, s_dead, j + 1, STAGES)
        acc_o, m_i, l_i, s_dead = _primal_block(s, acc_o, m_i, l_i, v_smem, vv_full, kv_empty, cols, N_K,
                                                n_blocks - 1, qk_scale, row_o, p_layout, STAGES, BLOCK_N, True)
        mbarrier.arrive(kv_empty.index((n_blocks - 1) % STAGES), count=1)

        l_safe = gl.where(l_i == 0.0, 1.0, l_i)
        rows_s = row0 + WG * BM + gl.arange(0, BM, layout=row_s)
        gl.store(LSE + lse_base + rows_s, (m_i + gl.log2(l_safe)) * 0.6931471805599453, mask=rows_s < N_Q)
        o = acc_o * gl.convert_layout(1.0 / l_safe, row_o)[:, None]
        rows = row0 + WG * BM + gl.arange(0, BM, layout=row_o)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        gl.store(O + o_base + rows[:, None] * stride_om + offs_d[None, :], o.to(dtype), mask=(rows < N_Q)[:, None])

    @gluon.jit
    def _primal_consumer_0(q_smem, k_smem, v_smem, q_bar, kk_full, vv_full, kv_empty, O, LSE, o_base, lse_base,
                           stride_om, row0, N_Q, N_K, n_blocks, scale):
        _primal_consumer(q_smem, k_smem, v_smem, q_bar, kk_full, vv_full, kv_empty, O, LSE, o_base, lse_base,
                         stride_om, row0, N_Q, N_K, n_blocks, scale, 0)

    @gluon.jit
    def _primal_consumer_1(q_smem, k_smem, v_smem, q_bar, kk_full, vv_full, kv_empty, O, LSE, o_base, lse_base,
                           stride_om, row0, N_Q, N_K, n_blocks, scale):
        _primal_consumer(q_smem, k_smem, v_smem, q_bar, kk_full, vv_full, kv_empty, O, LSE, o_base, lse_base,
                         stride_om, row0, N_Q, N_K, n_blocks, scale, 1)

    @gluon.jit
    def _primal_fwd_kernel(
        Q, K, V, O, LSE,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_om,
        NUM_HEADS, N_Q, N_K, scale,
        HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):
        """O = softmax(s Q K^T) V and LSE: the fused kernel's layout with one score and one value GEMM."""
        BM: gl.constexpr = 64
        dtype: gl.constexpr = Q.dtype.element_ty
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        off_b = (pid_bh // NUM_HEADS).to(gl.int64)
        off_h = (pid_bh % NUM_HEADS).to(gl.int64)
        row0 = pid_m * (2 * BM)
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_desc = _head_desc(Q, stride_qb, stride_qh, stride_qm, off_b, off_h, N_Q, BM, HEAD_DIM, q_layout)
        k_desc = _head_desc(K, stride_kb, stride_kh, stride_kn, off_b, off_h, N_K, BLOCK_N, HEAD_DIM, kv_layout)
        v_desc = _head_desc(V, stride_vb, stride_vh, stride_vn, off_b, off_h, N_K, BLOCK_N, HEAD_DIM, kv_layout)
        q_smem = gl.allocate_shared_memory(dtype, [2, BM, HEAD_DIM], q_layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kk_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        vv_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        _init_barriers(q_bar, kk_full, vv_full, kv_empty, STAGES)
        n_blocks = gl.cdiv(N_K, BLOCK_N)
        lse_base = pid_bh.to(gl.int64) * N_Q
        o_base = off_b * stride_ob + off_h * stride_oh
        args = (q_smem, k_smem, v_smem, q_bar, kk_full, vv_full, kv_empty, O, LSE, o_base, lse_base, stride_om, row0,
                N_Q, N_K, n_blocks, scale)
        gl.warp_specialize(
            [
                (_primal_consumer_0, args),
                (_primal_consumer_1, args),
                (_primal_producer, (k_desc, v_desc, q_desc, q_smem, k_smem, v_smem, q_bar, kk_full, vv_full,
                                    kv_empty, row0, n_blocks)),
            ],
            [4, 4],
            [240, 24],
        )
    # fmt: on


# primal (BLOCK_N, STAGES) per head dim: 128-key blocks; shared memory 32 + 2 x 64 KiB (D=128), 16 + 3 x 32 KiB
PRIMAL_TILES = {64: (128, 3), 128: (128, 2)}


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # global memory where the CTAs write their in-kernel TMA descriptors (Triton asks this allocator for it)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _launch(kernel, strided, lse, scale: float, tiles: tuple[int, int], **flags) -> None:
    """One launch: `strided` = the kernel's (B, H, N, D) tensor arguments in order (q first, k second), whose
    batch/head/row strides follow, then LSE, the head count, the lengths and the scale."""
    if not available():
        raise RuntimeError(f"attention_jvp_sm90: this Triton has no usable Gluon API ({_IMPORT_ERROR})")
    import triton

    q, k = strided[0], strided[1]
    B, H, N_Q, D = q.shape
    block_n, stages = tiles
    triton.set_allocator(_scratch)
    strides = [st for t in strided for st in (t.stride(0), t.stride(1), t.stride(2))]
    grid = (triton.cdiv(N_Q, 2 * BLOCK_M_WG), B * H)
    kernel[grid](*strided, lse, *strides, H, N_Q, k.shape[2], scale, HEAD_DIM=D, BLOCK_N=block_n, STAGES=stages,
                 num_warps=4, **flags)  # fmt: skip


def fused_forward(q, k, v, q_t, k_t, v_t, o, o_t, lse, scale: float, tiles: tuple[int, int] | None = None):
    """Write O, O_t (B, H, Nq, D) and LSE (B, H, Nq) of the fused forward + JVP into o, o_t, lse.

    Inputs as `attention_jvp_forward` takes them, already checked there and eligible (`_sm90_eligible`);
    tiles = (BLOCK_N, STAGES) overrides `SM90_TILES` (benchmarks only).
    """
    _launch(_fused_fwd_kernel, (q, k, v, q_t, k_t, v_t, o, o_t), lse, scale, tiles or SM90_TILES[q.shape[-1]])
    return o, o_t, lse


def tangent_forward(q, k, v, q_t, k_t, v_t, o, lse, o_t, scale: float, tiles: tuple[int, int] | None = None):
    """Write O_t into o_t from the saved forward output o and LSE (natural log, (B, H, Nq) contiguous);
    the warp-specialised counterpart of the Triton kernel's tangent-only mode."""
    tiles = tiles or SM90_TILES[q.shape[-1]]
    _launch(_fused_fwd_kernel, (q, k, v, q_t, k_t, v_t, o, o_t), lse, scale, tiles, TANGENT=True)
    return o_t


def primal_forward(q, k, v, o, lse, scale: float, tiles: tuple[int, int] | None = None):
    """Write O and LSE (natural log) of plain attention into o, lse with the warp-specialised primal kernel."""
    _launch(_primal_fwd_kernel, (q, k, v, o), lse, scale, tiles or PRIMAL_TILES[q.shape[-1]])
    return o, lse
