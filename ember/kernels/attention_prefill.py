"""Prefill / chunked-prefill attention over the paged KV cache (varlen flash attention).

Each sequence brings n new queries at positions seq_len - n .. seq_len - 1 (earlier positions are already
cached: prefix caching, chunked prefill). A program takes BLOCK_Q of a sequence's new tokens times the G
query heads of one kv head, folded into BLOCK_M = BLOCK_Q * G rows, so K/V are read once per kv head.
Grid (T // BLOCK_Q + B, Hk): sequence b owns programs from query_start_loc[b] // BLOCK_Q + b on, enough for
its ceil(n / BLOCK_Q) blocks; the kernel finds b by counting, so the host reads no device value."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels.attention_common import LOG2E, NO_WINDOW, dot_flags, paged_kv_step


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, qk_scale, window, num_seqs,
                    s_q_t, s_q_h, s_c_p, s_c_h, s_c_s, s_bt, s_o_t, s_o_h,
                    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr,
                    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    bi = tl.arange(0, BLOCK_B)
    first_blk = tl.load(qsl_ptr + bi, mask=bi < num_seqs, other=0) // BLOCK_Q + bi
    b = tl.sum(((first_blk <= pid) & (bi < num_seqs)).to(tl.int32), 0) - 1
    qs = tl.load(qsl_ptr + b)
    n = tl.load(qsl_ptr + b + 1) - qs
    blk = pid - (qs // BLOCK_Q + b)  # which block of this sequence's new tokens
    q0 = tl.load(seq_lens_ptr + b) - n  # position of the first new token

    rows = tl.arange(0, BLOCK_M)
    tok = rows // G
    qi = blk * BLOCK_Q + tok  # (M,) index among the new tokens
    row_ok = (tok < BLOCK_Q) & (qi < n)
    heads = kvh * G + rows % G
    qpos = q0 + qi
    d = tl.arange(0, HEAD_DIM)
    q_off = (qs + qi).to(tl.int64)[:, None] * s_q_t + heads[:, None] * s_q_h + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)  # (M, D)
    if DOT_F32:
        q = q.to(tl.float32)
    # Keys this block can see: from the first query's window start to the last query's position.
    kv_lo = tl.maximum(q0 + blk * BLOCK_Q - window + 1, 0)
    kv_hi = q0 + tl.minimum(n, (blk + 1) * BLOCK_Q)
    kv_hi = tl.where(blk * BLOCK_Q < n, kv_hi, kv_lo)  # spare program: no work

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    head_off = kvh.to(tl.int64) * s_c_h
    for kstart in range(kv_lo, kv_hi, BLOCK_N):
        acc, m_i, l_i = paged_kv_step(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, head_off, kstart, kv_hi, qpos,
                                      window, qk_scale, s_c_p, s_c_s, PAGE, BLOCK_N, HEAD_DIM, DOT_F32,
                                      DOT_PREC)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = (qs + qi).to(tl.int64)[:, None] * s_o_t + heads[:, None] * s_o_h + d[None, :]
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def default_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by head size (fp32 tiles take twice the shared memory)."""
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale: float,
                      sliding_window: int | None = None, config: tuple[int, int, int, int] | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """q: (T, Hq, D) new tokens of B sequences (ragged, query_start_loc (B + 1,) int32 on the device);
    caches (P, Hk, page, D) already holding them; seq_lens (B,) int32 device. Returns (T, Hq, D)."""
    t, hq, dim = q.shape
    batch, hk, page = block_tables.shape[0], k_cache.shape[1], k_cache.shape[2]
    g = hq // hk
    block_m, block_n, warps, stages = config or default_config(dim, q.dtype)
    block_m = max(block_m, triton.next_power_of_2(g))
    block_q = block_m // g
    out = torch.empty((t, hq, dim), dtype=q.dtype, device=q.device) if out is None else out
    assert out.shape == q.shape and out.stride(-1) == 1
    if t == 0:
        return out
    dot_f32, dot_prec = dot_flags(q.dtype)
    grid = (t // block_q + batch, hk)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, scale * LOG2E,
        sliding_window or NO_WINDOW, batch, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=g, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_B=max(16, triton.next_power_of_2(batch)),
        HEAD_DIM=dim, PAGE=page, BLOCK_N=block_n, DOT_F32=dot_f32, DOT_PREC=dot_prec,
        num_warps=warps, num_stages=stages)
    return out
