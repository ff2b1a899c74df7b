"""Paged attention entry point (picks the decode or the prefill kernel), the fused rope + KV write + decode
entry point, the KV-cache write, and the torch SDPA prefill path the benchmark compares against."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ember.kernels import attention_decode
from ember.kernels.attention_decode import decode_attention
from ember.kernels.attention_prefill import prefill_attention


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, n_heads, s_k_t, s_k_h, s_v_t, s_v_h,
                     s_c_p, s_c_h, s_c_s, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # NOTE: a negative slot marks a padding token (CUDA-graph batches): nothing is written for it.
    mask = (h < tl.where(slot >= 0, n_heads, 0)) & (d < HEAD_DIM)
    dst = (slot // PAGE) * s_c_p + h * s_c_h + (slot % PAGE) * s_c_s + d
    k = tl.load(k_ptr + t * s_k_t + h * s_k_h + d, mask=mask, other=0.0)
    v = tl.load(v_ptr + t * s_v_t + h * s_v_h + d, mask=mask, other=0.0)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: (T, Hk, D) (strided views allowed); caches (P, Hk, page, D); slot_mapping (T,) int;
    a negative slot is skipped."""
    t, hk, dim = k.shape
    assert v.shape == k.shape and k.stride(-1) == 1 and v.stride(-1) == 1, "store_kv: bad k/v layout"
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert k_cache.shape[1] == hk and k_cache.shape[3] == dim and slot_mapping.shape == (t,)
    if t == 0:
        return
    _store_kv_kernel[(t,)](
        k, v, k_cache, v_cache, slot_mapping, hk, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), HEAD_DIM=dim, PAGE=k_cache.shape[2],
        BLOCK_H=triton.next_power_of_2(hk), BLOCK_D=triton.next_power_of_2(dim), num_warps=4)


def _device_int32(x, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        ok = x.dtype == torch.int32 and x.device == device
        return x if ok else x.to(device=device, dtype=torch.int32)
    return torch.tensor([int(v) for v in x], dtype=torch.int32, device=device)


def _check_layout(q, k_cache, v_cache, block_tables) -> None:
    hq, dim = q.shape[1], q.shape[2]
    hk, page = k_cache.shape[1], k_cache.shape[2]
    assert q.dim() == 3 and q.stride(-1) == 1, "paged_attention: q must be (T, Hq, D), last dim contiguous"
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert k_cache.dtype == v_cache.dtype == q.dtype, "paged_attention: q and the caches must share a dtype"
    assert hq % hk == 0 and k_cache.shape[3] == dim, "paged_attention: Hq must be a multiple of Hk"
    assert dim & (dim - 1) == 0 and 16 <= dim <= 256, "paged_attention: head_dim: a power of two, 16..256"
    assert page & (page - 1) == 0, "paged_attention: page size must be a power of two"
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2


# Prompts with no cached prefix go to torch SDPA (FlashAttention / cuDNN) when the caller passes the new
# k/v and the host lists: measured faster than the Triton kernel on H100 (docs/dev/kernel-notes.md).
PREFILL_SDPA = True


def _sdpa_applies(k, seq_lens_cpu, qsl_cpu, sliding_window) -> bool:
    if not PREFILL_SDPA or k is None or seq_lens_cpu is None or qsl_cpu is None:
        return False
    news = [e - s for s, e in itertools.pairwise(qsl_cpu)]
    no_prefix = all(int(n) == int(total) for n, total in zip(news, seq_lens_cpu))
    return no_prefix and (sliding_window is None or sliding_window >= max(news))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens, query_start_loc, scale: float, sliding_window: int | None = None, *,
                    max_query_len: int | None = None, k: torch.Tensor | None = None,
                    v: torch.Tensor | None = None, seq_lens_cpu: Sequence[int] | None = None,
                    query_start_loc_cpu: Sequence[int] | None = None) -> torch.Tensor:
    """Same contract as reference.paged_attention. seq_lens (B,) / query_start_loc (B + 1,) should be int32
    device tensors (host lists are copied over, which a CUDA graph cannot capture). max_query_len (a host
    int, ForwardBatch.max_query_len) picks the kernel: 1 -> split-K decode, else prefill. When it is None:
    decode if T == B, which assumes every sequence brings at least one new token.
    Optional, for prefill only: k, v (T, Hk, D), the new tokens' (rotated) keys/values, and the host lists
    seq_lens_cpu / query_start_loc_cpu; with them a batch whose sequences have no cached prefix (and no
    window shorter than a prompt) runs through torch SDPA on k/v instead of reading the cache."""
    _check_layout(q, k_cache, v_cache, block_tables)
    if max_query_len is None:
        max_query_len = 1 if q.shape[0] == block_tables.shape[0] else 2
    if max_query_len > 1 and _sdpa_applies(k, seq_lens_cpu, query_start_loc_cpu, sliding_window):
        return prefill_sdpa(q, k, v, [int(x) for x in query_start_loc_cpu], scale)
    seq_lens = _device_int32(seq_lens, q.device)
    query_start_loc = _device_int32(query_start_loc, q.device)
    run = decode_attention if max_query_len <= 1 else prefill_attention
    return run(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window)


def decode_attention_rope(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                          query_start_loc, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Decode only (at most one new token per sequence): rope + the new token's KV-cache write + paged
    attention in one launch (attention_decode.decode_attention_rope). q (T, Hq, D), k, v (T, Hk, D) are the
    unrotated projections and are not written; seq_lens / query_start_loc: int32 device tensors (host lists
    are copied over). Returns (T, Hq, D)."""
    _check_layout(q, k_cache, v_cache, block_tables)
    seq_lens = _device_int32(seq_lens, q.device)
    query_start_loc = _device_int32(query_start_loc, q.device)
    return attention_decode.decode_attention_rope(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping,
                                                  block_tables, seq_lens, query_start_loc, scale, sliding_window)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence: q (n, Hq, D), k, v (n, Hk, D) -> (n, Hq, D), a view of SDPA's output."""
    # NOTE: 4-D (1, H, n, D) inputs: SDPA's flash / cuDNN backends reject 3-D ones (math fallback).
    qb, kb, vb = (x.transpose(0, 1)[None] for x in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
    return o[0].transpose(0, 1)


def prefill_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_start_loc: Sequence[int],
                 scale: float) -> torch.Tensor:
    """Causal attention of sequences with no cached prefix on their contiguous new k/v through torch SDPA.
    q: (T, Hq, D), k, v: (T, Hk, D), query_start_loc host list. Returns (T, Hq, D)."""
    if len(query_start_loc) == 2 and query_start_loc[0] == 0 and query_start_loc[1] == q.shape[0]:
        return _sdpa_causal(q, k, v, scale)  # one sequence: SDPA's output as it is, no copy into `out`
    out = torch.empty_like(q)
    for s, e in itertools.pairwise(query_start_loc):
        out[s:e] = _sdpa_causal(q[s:e], k[s:e], v[s:e], scale)
    return out
