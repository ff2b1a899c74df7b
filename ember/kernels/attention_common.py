"""The inner step shared by the decode and prefill attention kernels: one block of BLOCK_N keys/values read
in place from the paged cache, folded into a running (flash-attention) softmax in the exp2 domain."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether kernels run on the GPU or in its CPU interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30  # "window" value that masks nothing


def dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_F32, DOT_PREC): fp32 inputs use exact fp32 dots; the interpreter stores bf16 as raw uint16 and
    cannot multiply it, so it upcasts every dot operand."""
    f32 = dtype == torch.float32 or INTERPRET
    return f32, ("ieee" if f32 else "tf32")


@triton.jit
def paged_kv_load(kc_ptr, vc_ptr, bt_row, head_off, kstart, kv_hi, s_c_p, s_c_s, PAGE: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    # Keys/values kstart .. kstart + BLOCK_N (masked at kv_hi) read in place from the paged cache: (N, D) each.
    kpos = kstart + tl.arange(0, BLOCK_N)
    kmask = kpos < kv_hi
    page = tl.load(bt_row + kpos // PAGE, mask=kmask, other=0).to(tl.int64)
    off = page * s_c_p + head_off + (kpos % PAGE).to(tl.int64) * s_c_s  # (N,) element offsets
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(kc_ptr + off[:, None] + d[None, :], mask=kmask[:, None], other=0.0)  # (N, D)
    v = tl.load(vc_ptr + off[:, None] + d[None, :], mask=kmask[:, None], other=0.0)
    return k, v


@triton.jit
def paged_kv_fold(q, acc, m_i, l_i, k, v, kstart, kv_hi, qpos, window, qk_scale, BLOCK_N: tl.constexpr,
                  DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    # q: (M, D); acc: (M, D) f32; m_i, l_i: (M,) running max (log2 units) and sum; qpos: (M,) positions;
    # k, v: (N, D) the keys kstart .. kstart + BLOCK_N (paged_kv_load). Key j is visible to row r when
    # j < kv_hi and qpos[r] - window < j <= qpos[r].
    kpos = kstart + tl.arange(0, BLOCK_N)
    kmask = kpos < kv_hi
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (M, N)
    visible = kmask[None, :] & (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet: keep exp2 finite
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def paged_kv_step(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, head_off, kstart, kv_hi, qpos, window, qk_scale,
                  s_c_p, s_c_s, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    # One block of keys: load (paged_kv_load) and fold into the running softmax (paged_kv_fold).
    k, v = paged_kv_load(kc_ptr, vc_ptr, bt_row, head_off, kstart, kv_hi, s_c_p, s_c_s, PAGE, BLOCK_N, HEAD_DIM)
    return paged_kv_fold(q, acc, m_i, l_i, k, v, kstart, kv_hi, qpos, window, qk_scale, BLOCK_N, DOT_F32,
                         DOT_PREC)
