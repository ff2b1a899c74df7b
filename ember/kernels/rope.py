"""Rotary embedding ("rotate half", HF Llama convention) of q and k in one launch, optionally fused with
the KV-cache write of the rotated k and of v (rope_store_kv), so decode spends one launch per layer on both.

The kernels never write their inputs: q and k are often strided views of the fused QKV projection output."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels import pdl


@triton.jit
def _rotate(src_ptr, dst_ptr, t, cos, sin, n_heads, s_src_t, s_src_h, s_dst_t, s_dst_h,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # One token's heads (n_heads, 2 * HALF): [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin]
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < n_heads) & (d < HALF)
    src = src_ptr + t * s_src_t + h * s_src_h + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty)
    dst = dst_ptr + t * s_dst_t + h * s_dst_h + d
    tl.store(dst, y1, mask=mask)
    tl.store(dst + HALF, y2, mask=mask)
    return y1, y2


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr,
                 n_q_heads, n_kv_heads,
                 s_q_t, s_q_h, s_k_t, s_k_h, s_v_t, s_v_h, s_qo_t, s_qo_h, s_ko_t, s_ko_h, s_cs,
                 s_c_p, s_c_h, s_c_s,
                 HALF: tl.constexpr, PAGE: tl.constexpr, STORE_KV: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cs_ptr + pos * s_cs + d, mask=d < HALF, other=0.0)  # (1, HALF) float32
    sin = tl.load(cs_ptr + pos * s_cs + HALF + d, mask=d < HALF, other=0.0)
    _rotate(q_ptr, qo_ptr, t, cos, sin, n_q_heads, s_q_t, s_q_h, s_qo_t, s_qo_h, HALF, BLOCK_HQ, BLOCK_HALF)
    k1, k2 = _rotate(k_ptr, ko_ptr, t, cos, sin, n_kv_heads, s_k_t, s_k_h, s_ko_t, s_ko_h,
                     HALF, BLOCK_HK, BLOCK_HALF)
    if STORE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        h = tl.arange(0, BLOCK_HK)[:, None]
        # NOTE: a negative slot marks a padding token (CUDA-graph batches): nothing is written for it.
        mask = (h < tl.where(slot >= 0, n_kv_heads, 0)) & (d < HALF)
        dst = (slot // PAGE) * s_c_p + h * s_c_h + (slot % PAGE) * s_c_s + d
        tl.store(kc_ptr + dst, k1.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(kc_ptr + dst + HALF, k2.to(kc_ptr.dtype.element_ty), mask=mask)
        v_src = v_ptr + t * s_v_t + h * s_v_h + d
        v1 = tl.load(v_src, mask=mask, other=0.0)
        v2 = tl.load(v_src + HALF, mask=mask, other=0.0)
        tl.store(vc_ptr + dst, v1.to(vc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + dst + HALF, v2.to(vc_ptr.dtype.element_ty), mask=mask)


def _launch(q, k, positions, cos_sin, kv=None, q_out=None, k_out=None):
    t, hq, dim = q.shape
    hk = k.shape[1]
    assert k.shape == (t, hk, dim) and q.stride(-1) == 1 and k.stride(-1) == 1, "rope: bad q/k layout"
    assert cos_sin.dtype == torch.float32 and cos_sin.stride(-1) == 1 and cos_sin.shape[-1] == dim
    assert dim % 2 == 0 and positions.shape == (t,)
    if q_out is None:
        q_out = torch.empty((t, hq, dim), dtype=q.dtype, device=q.device)  # (T, Hq, D)
    if k_out is None:
        k_out = torch.empty((t, hk, dim), dtype=k.dtype, device=k.device)  # (T, Hk, D)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.stride(-1) == 1 and k_out.stride(-1) == 1
    if kv is None:
        v = slots = kc = vc = k  # unused stand-ins
        page, kc_strides = 1, (0, 0, 0)
    else:
        v, kc, vc, slots = kv
        assert v.shape == k.shape and v.stride(-1) == 1
        assert kc.shape == vc.shape and kc.stride() == vc.stride()
        assert kc.shape[1] == hk and kc.shape[3] == dim and kc.stride(-1) == 1 and slots.shape == (t,)
        page, kc_strides = kc.shape[2], kc.stride()[:3]
    if t > 0:
        _rope_kernel[(t,)](
            q, k, v, q_out, k_out, positions, cos_sin, slots, kc, vc, hq, hk,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin.stride(0),
            *kc_strides,
            HALF=dim // 2, PAGE=page, STORE_KV=kv is not None, BLOCK_HQ=triton.next_power_of_2(hq),
            BLOCK_HK=triton.next_power_of_2(hk), BLOCK_HALF=triton.next_power_of_2(dim // 2), num_warps=4,
            **pdl.launch_kwargs(q.device))
    return q_out, k_out


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
         q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None):
    """q: (T, Hq, D), k: (T, Hk, D), positions: (T,), cos_sin: (max_pos, D) float32 [cos | sin].
    Returns new contiguous (q, k) (or q_out, k_out when given); the inputs are not modified."""
    return _launch(q, k, positions, cos_sin, None, q_out, k_out)


def rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, q_out=None, k_out=None):
    """rope(q, k) and store_kv(rotated k, v) in one launch. Returns the rotated (q, k)."""
    return _launch(q, k, positions, cos_sin, (v, k_cache, v_cache, slot_mapping), q_out, k_out)
