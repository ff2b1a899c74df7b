"""The store of the quantized matmul (qmatmul_kernels.py): split-K partial sums combined through a zeroed fp32
workspace, then the fused epilogue (kernels/epilogue.py) on the finished sums.

Split-K: each program adds its partial sums into the workspace; the last program of a column block (an atomic
counter) reads the sums back while re-zeroing them, finishes and stores the tile, and resets the counter, so
the workspace is zero again for the next launch (CUDA-graph replays included)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _operands(offs_m, m_mask, offs_n, n_mask, ss_in_ptr, res_ptr, stride_rm, gamma_ptr, NORM_IN: tl.constexpr,
              RESID: tl.constexpr):
    """What the epilogue reads besides the sums: NORM_IN the rows' sum of squares (BM,), RESID the residual
    tile (BM, BN) and gamma (BN,) (placeholders when off)."""
    ss = tl.load(ss_in_ptr + offs_m, mask=m_mask, other=0.0) if NORM_IN else 0.0
    if RESID:
        mask = m_mask[:, None] & n_mask[None, :]
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        gamma = tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0)
    else:
        res = 0.0
        gamma = 0.0
    return ss, res, gamma


@triton.jit
def _finish(y, offs_m, m_mask, offs_n, n_mask, N, out_ptr, stride_om, ss_in_ptr, eps, res_ptr, stride_rm,
            gamma_ptr, ss_out_ptr, ss, res, gamma, BM: tl.constexpr, BN: tl.constexpr, NORM_IN: tl.constexpr,
            RESID: tl.constexpr, GLU: tl.constexpr, LOADED: tl.constexpr):
    """Store the finished (BM, BN) fp32 sums y of a tile, with the steps of kernels/epilogue.py (LOADED: ss,
    res, gamma are `_operands`' loads, else they are loaded here, each where it is first needed):
    NORM_IN: x was h * gamma of un-normalized rows h: times the RMSNorm's 1/rms = rsqrt(mean(h^2) + eps);
    then y is rounded to the output dtype, as the unfused path stores it;
    RESID: h = y + residual is written back to the residual, the output is h * gamma (the next RMSNorm's
    weight) and mean(h^2) per row is accumulated into ss_out;
    GLU: the tile is [gate | up] halves (qmatmul_kernel), the output silu(gate) * up, BN/2 columns."""
    dt = out_ptr.dtype.element_ty
    if NORM_IN:
        if not LOADED:
            ss = tl.load(ss_in_ptr + offs_m, mask=m_mask, other=0.0)
        y = y * tl.rsqrt(ss + eps)[:, None]
    y = y.to(dt).to(tl.float32)
    mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if GLU:  # (BM, BN) -> (BM, BN/2, 2): [.., 0] gate, [.., 1] up of the same output column
        gate, up = tl.split(tl.permute(tl.reshape(y, (BM, 2, BN // 2)), (0, 2, 1)))
        cols = tl.program_id(0) * (BN // 2) + tl.arange(0, BN // 2)
        act = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + offs_m[:, None] * stride_om + cols[None, :], act.to(dt),
                 mask=m_mask[:, None] & (cols < N // 2)[None, :])
    elif RESID:
        res_ptrs = res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :]
        if not LOADED:
            res = tl.load(res_ptrs, mask=mask, other=0.0)
        h = (y + res.to(tl.float32)).to(dt)
        tl.store(res_ptrs, h, mask=mask)
        hf = tl.where(mask, h.to(tl.float32), 0.0)
        tl.atomic_add(ss_out_ptr + offs_m, tl.sum(hf * hf, axis=1) / N, mask=m_mask, sem="relaxed")
        if not LOADED:
            gamma = tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0)
        tl.store(out_ptrs, (hf * gamma.to(tl.float32)[None, :]).to(dt), mask=mask)
    else:
        tl.store(out_ptrs, y.to(dt), mask=mask)


@triton.jit
def store_tile(acc, out_ptr, stride_om, buf_ptr, ibuf_ptr, cnt_ptr, offs_m, m_mask, offs_n, n_mask, N,
               ss_in_ptr, eps, res_ptr, stride_rm, gamma_ptr, ss_out_ptr, BM: tl.constexpr, BN: tl.constexpr,
               ATOMIC: tl.constexpr, NORM_IN: tl.constexpr, RESID: tl.constexpr, GLU: tl.constexpr,
               EPI_EARLY: tl.constexpr = False):
    """acc (BM, BN): this program's partial sums (ATOMIC: one of several K splits) -> the stored tile.
    EPI_EARLY (ATOMIC): every program loads the epilogue's operands before its atomics, so that the last one
    has them when the sums are complete instead of waiting one more round trip then."""
    if ATOMIC:
        if EPI_EARLY:
            ss, res, gamma = _operands(offs_m, m_mask, offs_n, n_mask, ss_in_ptr, res_ptr, stride_rm, gamma_ptr,
                                       NORM_IN, RESID)
        mask = m_mask[:, None] & n_mask[None, :]
        buf_ptrs = buf_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(buf_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums are issued before the counter is released
        cnt = cnt_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        if tl.atomic_add(cnt, 1, sem="acq_rel") == tl.num_programs(1) - 1:  # last split of this block
            # read the sums back and re-zero them (exchanged as int32: same bits, wider support)
            ibuf_ptrs = ibuf_ptr + offs_m[:, None] * N + offs_n[None, :]
            zero = tl.zeros(acc.shape, tl.int32)
            total = tl.atomic_xchg(ibuf_ptrs, zero, mask=mask, sem="relaxed").to(tl.float32, bitcast=True)
            if not EPI_EARLY:
                ss, res, gamma = 0.0, 0.0, 0.0  # loaded by _finish
            _finish(total, offs_m, m_mask, offs_n, n_mask, N, out_ptr, stride_om, ss_in_ptr, eps, res_ptr,
                    stride_rm, gamma_ptr, ss_out_ptr, ss, res, gamma, BM, BN, NORM_IN, RESID, GLU, EPI_EARLY)
            tl.atomic_xchg(cnt, 0, sem="relaxed")
    else:
        _finish(acc, offs_m, m_mask, offs_n, n_mask, N, out_ptr, stride_om, ss_in_ptr, eps, res_ptr, stride_rm,
                gamma_ptr, ss_out_ptr, 0.0, 0.0, 0.0, BM, BN, NORM_IN, RESID, GLU, False)
