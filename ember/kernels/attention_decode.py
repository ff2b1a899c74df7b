"""Decode attention (one new token per sequence) over the paged KV cache, split-K "flash decoding".

Grid (B, Hk, NUM_SPLITS): a program takes one kv head with all G = Hq / Hk query heads that share it (so
K/V are read once) and one slice of the sequence's keys; a small reduce kernel merges the slices with their
log-sum-exp. NOTE: nothing here reads device values on the host and the grid depends only on (B, Hk) and
the block table's capacity, so a decode step can be captured in a CUDA graph and replayed with new
seq_lens / block tables."""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ember.kernels import pdl
from ember.kernels.attention_common import LOG2E, NO_WINDOW, dot_flags, paged_kv_step

MIN_SPLIT_TOKENS = 128  # fewer keys per split than this costs more in the reduce than it wins
MAX_SPLITS = 64


@triton.jit
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, part_o_ptr, part_lse_ptr,
                   qk_scale, window, s_q_t, s_q_h, s_c_p, s_c_h, s_c_s, s_bt, s_o_t, s_o_h,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_F32: tl.constexpr,
                   DOT_PREC: tl.constexpr, PDL: tl.constexpr):
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    qs = tl.load(qsl_ptr + b)
    n_q = tl.load(qsl_ptr + b + 1) - qs  # 1, or 0 for a sequence without a new token
    hi = tl.load(seq_lens_ptr + b)
    lo = tl.maximum(hi - window, 0)
    hi = tl.where(n_q > 0, hi, lo)
    # Splits cut the visible keys [lo, hi) into NUM_SPLITS slices of whole BLOCK_N blocks.
    span = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * span
    end = tl.minimum(start + span, hi)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * G + g
    q = tl.load(q_ptr + qs.to(tl.int64) * s_q_t + heads[:, None] * s_q_h + d[None, :],
                mask=(g < G)[:, None], other=0.0)  # (BLOCK_G, D)
    if DOT_F32:
        q = q.to(tl.float32)
    qpos = tl.zeros([BLOCK_G], tl.int32) + (hi - 1)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    head_off = kvh.to(tl.int64) * s_c_h
    for kstart in range(start, end, BLOCK_N):
        acc, m_i, l_i = paged_kv_step(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, head_off, kstart, end, qpos,
                                      window, qk_scale, s_c_p, s_c_s, PAGE, BLOCK_N, HEAD_DIM, DOT_F32,
                                      DOT_PREC)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        dst = out_ptr + qs.to(tl.int64) * s_o_t + heads[:, None] * s_o_h + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=(g < tl.where(n_q > 0, G, 0))[:, None])
    else:
        # Partials: (B, Hq, NUM_SPLITS, D) float32 outputs and (B, Hq, NUM_SPLITS) log2-sum-exp.
        row = (b * (tl.num_programs(1) * G) + heads).to(tl.int64) * NUM_SPLITS + split
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g < G)
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=(g < G)[:, None])


@triton.jit
def _decode_reduce_kernel(part_o_ptr, part_lse_ptr, qsl_ptr, out_ptr, s_o_t, s_o_h,
                          HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr):
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    qs = tl.load(qsl_ptr + b)
    n_q = tl.load(qsl_ptr + b + 1) - qs
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM)
    row = (b * tl.num_programs(1) + h).to(tl.int64) * NUM_SPLITS + sp  # (S,)
    lse = tl.load(part_lse_ptr + row)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # empty splits weigh 0
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :])  # (S, D)
    total = tl.sum(w, 0)
    o = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + qs.to(tl.int64) * s_o_t + h * s_o_h + d, o.to(out_ptr.dtype.element_ty),
             mask=d < tl.where(n_q > 0, HEAD_DIM, 0))


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, but enough to exercise the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """Splits per (sequence, kv head): enough programs for ~2 waves over the SMs, a power of two, and no
    more than the longest possible sequence (capacity = pages per table * page size) can feed."""
    want = math.ceil(2 * _sm_count(device) / max(batch * kv_heads, 1))
    most = max(capacity // MIN_SPLIT_TOKENS, 1)
    return min(triton.next_power_of_2(max(min(want, most), 1)), MAX_SPLITS)


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale: float,
                     sliding_window: int | None = None, num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int = 4,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q: (T, Hq, D) with at most one new token per sequence; caches (P, Hk, page, D); block_tables (B, max
    pages) int32; seq_lens (B,) and query_start_loc (B + 1,) int32 device tensors. Returns (T, Hq, D)."""
    t, hq, dim = q.shape
    batch, hk, page = block_tables.shape[0], k_cache.shape[1], k_cache.shape[2]
    if num_splits is None:
        num_splits = choose_num_splits(batch, hk, block_tables.shape[1] * page, q.device)
    block_n = block_n or 32  # measured: 32 beat 64 and 128 on H100 (docs/dev/kernel-notes.md)
    g = hq // hk
    out = torch.empty((t, hq, dim), dtype=q.dtype, device=q.device) if out is None else out
    assert out.shape == q.shape and out.stride(-1) == 1
    if num_splits > 1:
        part_o = torch.empty((batch, hq, num_splits, dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, hq, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    dot_f32, dot_prec = dot_flags(q.dtype)
    _decode_kernel[(batch, hk, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_o, part_lse,
        scale * LOG2E, sliding_window or NO_WINDOW, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), HEAD_DIM=dim, PAGE=page, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, DOT_F32=dot_f32, DOT_PREC=dot_prec, num_warps=num_warps,
        **pdl.launch_kwargs(q.device))
    if num_splits > 1:
        _decode_reduce_kernel[(batch, hq)](part_o, part_lse, query_start_loc, out, out.stride(0),
                                           out.stride(1), HEAD_DIM=dim, NUM_SPLITS=num_splits, num_warps=4,
                                           **pdl.launch_kwargs(q.device))
    return out

