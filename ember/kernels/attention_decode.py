"""Decode attention (one new token per sequence) over the paged KV cache: split-K "flash decoding" in ONE
launch per layer.

Grid (B, Hk, NUM_SPLITS): a program takes one kv head with all G = Hq / Hk query heads that share it (so
K/V are read once) and one slice of the sequence's keys. With NUM_SPLITS > 1 each program writes its
partial (o, log2-sum-exp), then bumps a per-(b, kv head) counter; the program that comes last merges all
slices and writes the output (no separate reduce kernel). With ROPE the kernel also rotates q and the new
key itself, folds the new token in from registers and writes its rotated k and v into the cache slot.
NOTE: nothing here reads device values on the host and the grid depends only on (B, Hk) and the block
table's capacity, so a decode step can be captured in a CUDA graph and replayed with new seq_lens / block
tables. The counters are zero between launches; two launches that run concurrently on different streams
must not share a (B, Hk) counter range (the engine runs one stream)."""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ember.kernels import pdl
from ember.kernels.attention_common import (
    LOG2E,
    NO_WINDOW,
    dot_flags,
    paged_kv_fold,
    paged_kv_load,
    paged_kv_step,
)

# Keys of capacity per split, at least: one BLOCK_N block. 128 gave 8 splits of 96 keys for a 512-token
# prompt in `ember bench`, 32 gives 32 splits of 32: 8B decode 457.9 -> 464.7 tok/s (call J1,
# docs/benchmarks.md). Splits without keys cost little: their programs exit and the merge skips them.
# EMBER_ATTN_MIN_SPLIT overrides it (A/B runs).
MIN_SPLIT_TOKENS = int(os.environ.get("EMBER_ATTN_MIN_SPLIT", "32"))
# At most this many splits: with early reads the kernel holds 255 registers, 2 programs an SM, so 64 splits of
# 8 kv heads (512 programs) took two waves on an H100. Llama-3-8B decode with the engine's 4096-token tables:
# 478.7 / 478.9 tok/s at 64, 508.8 / 508.8 at 32 (call J6). EMBER_ATTN_MAX_SPLITS overrides it (A/B runs).
MAX_SPLITS = int(os.environ.get("EMBER_ATTN_MAX_SPLITS", "32"))
# Partial-output elements the last program holds at once while merging (registers). With early reads the
# kernel takes 255 registers anyway (sm_90, offline: 168 without them, 254 with twice this), so it merges
# EARLY_MERGE_SCALE times as many: 32 splits of 4 heads in one L2 round trip, still without spills
# (EMBER_ATTN_MERGE_SCALE overrides it, A/B runs).
MERGE_ELEMS = 4096
EARLY_MERGE_SCALE = int(os.environ.get("EMBER_ATTN_MERGE_SCALE", "4"))


@triton.jit
def _load_rotated(row_ptr, mask, cos, sin, d, HALF: tl.constexpr):
    # rows (M, 1) of D elements -> fp32 (M, D) rotated "rotate half": [x1 | x2] -> [x1 c - x2 s | x2 c + x1 s]
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    x = tl.load(row_ptr + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(row_ptr + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    return tl.where(d[None, :] < HALF, x * cos - xp * sin, x * cos + xp * sin)


@triton.jit
def _new_token_step(q, acc, m_i, l_i, kn, vn, qk_scale, DOT_F32: tl.constexpr):
    # One online-softmax step with the single new key kn / value vn (1, D), held in registers.
    s = tl.sum(q.to(tl.float32) * kn.to(tl.float32), 1) * qk_scale  # (M,); always visible
    m_new = tl.maximum(m_i, s)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new)
    if DOT_F32:
        vn = vn.to(tl.float32)
    acc = acc * alpha[:, None] + p.to(vn.dtype)[:, None].to(tl.float32) * vn.to(tl.float32)
    return acc, m_new, l_i * alpha + p


@triton.jit
def _merge(part_o_ptr, part_lse_ptr, row0, n_act, G: tl.constexpr, MERGE_G: tl.constexpr,
           SPLIT_CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    # The partials of the first n_act splits (the others hold no key) of G query heads (rows row0 + g),
    # merged by their log2-sum-exp: (MERGE_G, D). Chunk by chunk with a running maximum, so that a chunk's
    # weights and outputs are loaded together: one L2 round trip a chunk, not one more for the weights.
    # NOTE: other programs wrote these partials: read through L2 (.cg), after the acq_rel counter.
    g = tl.arange(0, MERGE_G)
    c = tl.arange(0, SPLIT_CHUNK)
    d = tl.arange(0, HEAD_DIM)
    rows = (row0 + g).to(tl.int64) * NUM_SPLITS  # (MG,)
    m = tl.full([MERGE_G], float("-inf"), tl.float32)
    total = tl.zeros([MERGE_G], tl.float32)
    acc = tl.zeros([MERGE_G, HEAD_DIM], tl.float32)
    for s0 in range(0, n_act, SPLIT_CHUNK):
        r = rows[:, None] + s0 + c[None, :]  # (MG, C)
        live = (g < G)[:, None] & (s0 + c < n_act)[None, :]
        lse = tl.load(part_lse_ptr + r, mask=live, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(part_o_ptr + r[:, :, None] * HEAD_DIM + d[None, None, :], mask=live[:, :, None], other=0.0,
                    cache_modifier=".cg")  # (MG, C, D)
        m_new = tl.maximum(m, tl.max(lse, 1))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty splits weigh 0
        alpha = tl.exp2(m - ref)
        w = tl.exp2(lse - ref[:, None])
        total = total * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 1)
        m = m_new
    return acc / tl.where(total > 0, total, 1.0)[:, None]


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, slot_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr,
                   qsl_ptr, out_ptr, part_o_ptr, part_lse_ptr, cnt_ptr, qk_scale, window,
                   s_q_t, s_q_h, s_k_t, s_k_h, s_v_t, s_v_h, s_cs, s_c_p, s_c_h, s_c_s, s_bt, s_o_t, s_o_h,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, MERGE_G: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
                   HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, ROPE: tl.constexpr, DOT_F32: tl.constexpr,
                   DOT_PREC: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    # EARLY (ROPE under PDL): the step's metadata and the first block of cached keys are read before the
    # PDL wait, while the QKV projection is still finishing (see `early` for why that is safe).
    pdl.launch_dependents(PDL)
    if not EARLY:
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
    first = start
    if EARLY:  # (ROPE only) the new key, position hi - 1, comes from registers, not from the cache
        k0, v0 = paged_kv_load(kc_ptr, vc_ptr, bt_ptr + b.to(tl.int64) * s_bt, kvh.to(tl.int64) * s_c_h, start,
                               tl.minimum(end, hi - 1), s_c_p, s_c_s, PAGE, BLOCK_N, HEAD_DIM)
        pos0 = tl.load(pos_ptr + qs, mask=n_q > 0, other=0).to(tl.int64)
        cos0 = tl.load(cs_ptr + pos0 * s_cs + d % (HEAD_DIM // 2))[None, :]  # (1, D) float32
        sin0 = tl.load(cs_ptr + pos0 * s_cs + HEAD_DIM // 2 + d % (HEAD_DIM // 2))[None, :]
        slot0 = tl.load(slot_ptr + qs, mask=n_q > 0, other=-1).to(tl.int64)
        pdl.wait(PDL)
        first = start + BLOCK_N
    heads = kvh * G + g
    q_mask = (g < tl.where(n_q > 0, G, 0))[:, None]
    q_rows = q_ptr + qs.to(tl.int64) * s_q_t + heads[:, None] * s_q_h  # (BLOCK_G, 1)
    if ROPE:
        HALF: tl.constexpr = HEAD_DIM // 2
        if EARLY:
            cos, sin = cos0, sin0
        else:
            pos = tl.load(pos_ptr + qs, mask=n_q > 0, other=0).to(tl.int64)
            cos = tl.load(cs_ptr + pos * s_cs + d % HALF)[None, :]  # (1, D) float32
            sin = tl.load(cs_ptr + pos * s_cs + HALF + d % HALF)[None, :]
        # rounded to the activation dtype after rotation, as the rope kernel does
        q = _load_rotated(q_rows, q_mask, cos, sin, d, HALF).to(q_ptr.dtype.element_ty)
        cache_end = tl.minimum(end, hi - 1)  # the new key (position hi - 1) comes from registers, not the cache
    else:
        q = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)  # (BLOCK_G, D)
        cache_end = end
    if DOT_F32:
        q = q.to(tl.float32)
    qpos = tl.zeros([BLOCK_G], tl.int32) + (hi - 1)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_bt
    head_off = kvh.to(tl.int64) * s_c_h
    if ROPE:  # noqa: SIM102 (compile-time flag, then a run-time condition: Triton keeps them apart)
        # Exactly one split holds position hi - 1: it folds the new token in (before the cache loop, so that
        # cos/sin are dead during it: 16 fewer registers) and writes it to the cache.
        if (start < hi) & (start + span >= hi):
            k_row = k_ptr + qs.to(tl.int64) * s_k_t + kvh * s_k_h + tl.zeros([1, 1], tl.int32)  # (1, 1)
            kn = _load_rotated(k_row, d[None, :] < HEAD_DIM, cos, sin, d, HALF)
            kn = kn.to(k_ptr.dtype.element_ty).to(kc_ptr.dtype.element_ty)  # (1, D)
            vn = tl.load(v_ptr + qs.to(tl.int64) * s_v_t + kvh * s_v_h + d[None, :])
            vn = vn.to(vc_ptr.dtype.element_ty)  # (1, D)
            acc, m_i, l_i = _new_token_step(q, acc, m_i, l_i, kn, vn, qk_scale, DOT_F32)
            slot = slot0 if EARLY else tl.load(slot_ptr + qs).to(tl.int64)
            # NOTE: a negative slot marks a padding token (CUDA-graph batches): nothing is written for it.
            dst = (slot // PAGE) * s_c_p + head_off + (slot % PAGE) * s_c_s + d[None, :]
            w_mask = d[None, :] < tl.where(slot >= 0, HEAD_DIM, 0)
            tl.store(kc_ptr + dst, kn, mask=w_mask)
            tl.store(vc_ptr + dst, vn, mask=w_mask)
    if EARLY:  # the block loaded before the wait (masked out entirely when the slice has no cached key)
        acc, m_i, l_i = paged_kv_fold(q, acc, m_i, l_i, k0, v0, start, cache_end, qpos, window, qk_scale, BLOCK_N,
                                      DOT_F32, DOT_PREC)
    for kstart in range(first, cache_end, BLOCK_N):
        acc, m_i, l_i = paged_kv_step(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, head_off, kstart, cache_end,
                                      qpos, window, qk_scale, s_c_p, s_c_s, PAGE, BLOCK_N, HEAD_DIM, DOT_F32,
                                      DOT_PREC)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    dst = out_ptr + qs.to(tl.int64) * s_o_t + kvh * G * s_o_h
    if NUM_SPLITS == 1:
        tl.store(dst + g[:, None] * s_o_h + d[None, :], o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # Partials: (B, Hq, NUM_SPLITS, D) float32 outputs and (B, Hq, NUM_SPLITS) log2-sum-exp.
        row0 = b * (tl.num_programs(1) * G) + kvh * G
        row = (row0 + g).to(tl.int64) * NUM_SPLITS + split
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g < G)
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=(g < G)[:, None])
        tl.debug_barrier()  # every thread's partials are issued before the counter is released
        cnt = cnt_ptr + b * tl.num_programs(1) + kvh
        if tl.atomic_add(cnt, 1, sem="acq_rel") == NUM_SPLITS - 1:  # the last split of (b, kv head)
            n_act = tl.cdiv(hi - lo, tl.maximum(span, 1))  # splits from n_act on hold no key
            merged = _merge(part_o_ptr, part_lse_ptr, row0, n_act, G, MERGE_G, SPLIT_CHUNK, HEAD_DIM, NUM_SPLITS)
            mg = tl.arange(0, MERGE_G)
            tl.store(dst + mg[:, None] * s_o_h + d[None, :], merged.to(out_ptr.dtype.element_ty),
                     mask=(mg < tl.where(n_q > 0, G, 0))[:, None])
            tl.atomic_xchg(cnt, 0, sem="relaxed")  # zero again for the next launch


@functools.cache
def early_enabled() -> bool:
    """EMBER_ATTN_EARLY=0 turns the early reads off (read once per process)."""
    return os.environ.get("EMBER_ATTN_EARLY", "1") != "0"


def early(device: torch.device) -> bool:
    """Whether the rope-fused decode reads the step's metadata (query_start_loc, seq_lens, block tables,
    positions, slots), cos/sin and its first block of cached keys/values before the PDL wait (PDL mode 2 only;
    EMBER_ATTN_EARLY=0 turns it off). Safe because none of these is written by the kernels it may overlap:
    the engine writes the metadata with plain launches at the start of a step (kernels/step.py
    prepare_decode, or torch ops), which complete before any PDL kernel of the step starts; cos/sin never
    change; and the keys read here are earlier tokens' (the new token's key is written by this kernel, after
    the wait). A caller that writes any of them with a PDL kernel right before this one must turn it off."""
    return pdl.mode(device) == 2 and early_enabled()


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


# Split counters per device, one int32 per (sequence, kv head), zero between launches (the last split
# program re-zeroes its own). Allocated on the first call (the engine runs eager steps before capturing a
# graph) and grown only when too small; a grown buffer replaces the old one for new calls while the old one
# stays alive for graphs that captured it.
_COUNTERS: dict[str, list[torch.Tensor]] = {}
MIN_COUNTERS = 4096


def _counters(device: torch.device, n: int) -> torch.Tensor:
    bufs = _COUNTERS.setdefault(str(device), [])
    if not bufs or bufs[-1].numel() < n:
        size = max(n, MIN_COUNTERS, 2 * bufs[-1].numel() if bufs else 0)
        bufs.append(torch.zeros(size, dtype=torch.int32, device=device))
    return bufs[-1]


def _launch(q, new_kv, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window,
            num_splits, block_n, num_warps, out, early_reads=None):
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
        counters = _counters(q.device, batch * hk)
    else:
        part_o = part_lse = counters = out  # unused
    if new_kv is None:
        k = v = positions = cos_sin = slots = q  # unused stand-ins
        kv_strides, s_cs = (0, 0, 0, 0), 0
    else:
        k, v, positions, cos_sin, slots = new_kv
        kv_strides, s_cs = (k.stride(0), k.stride(1), v.stride(0), v.stride(1)), cos_sin.stride(0)
    merge_g = triton.next_power_of_2(g)
    early_on = new_kv is not None and (early(q.device) if early_reads is None else early_reads)
    merge_elems = MERGE_ELEMS * (EARLY_MERGE_SCALE if early_on else 1)
    dot_f32, dot_prec = dot_flags(q.dtype)
    _decode_kernel[(batch, hk, num_splits)](
        q, k, v, positions, cos_sin, slots, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        part_o, part_lse, counters, scale * LOG2E, sliding_window or NO_WINDOW, q.stride(0), q.stride(1),
        *kv_strides, s_cs, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), MERGE_G=merge_g,
        SPLIT_CHUNK=max(1, min(num_splits, merge_elems // (merge_g * dim))), HEAD_DIM=dim, PAGE=page,
        BLOCK_N=block_n, NUM_SPLITS=num_splits, ROPE=new_kv is not None, DOT_F32=dot_f32, DOT_PREC=dot_prec,
        EARLY=early_on, num_warps=num_warps, **pdl.launch_kwargs(q.device))
    return out


def decode_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale: float,
                     sliding_window: int | None = None, num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int = 4,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q: (T, Hq, D), already rotated, with at most one new token per sequence, whose k/v are already in the
    cache; caches (P, Hk, page, D); block_tables (B, max pages) int32; seq_lens (B,) and query_start_loc
    (B + 1,) int32 device tensors. Returns (T, Hq, D)."""
    return _launch(q, None, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window,
                   num_splits, block_n, num_warps, out)


def decode_attention_rope(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                          query_start_loc, scale: float, sliding_window: int | None = None,
                          num_splits: int | None = None, block_n: int | None = None, num_warps: int = 4,
                          out: torch.Tensor | None = None, early_reads: bool | None = None) -> torch.Tensor:
    """rope + KV-cache write of the new token + decode attention in one launch. q (T, Hq, D), k, v (T, Hk, D):
    the unrotated projections (strided views allowed, last stride 1; never written); positions (T,);
    cos_sin (max_pos, D) float32 [cos | sin]; slot_mapping (T,), a negative slot writes nothing. The new
    token of sequence b is its key at position seq_lens[b] - 1 (read from k/v, not from the cache). Other
    arguments and the result as decode_attention. early_reads: read the metadata and the first cached block
    before the PDL wait (default: `early`); the kernel computes the same either way."""
    t, hk, dim = k.shape
    assert v.shape == k.shape and k.stride(-1) == 1 and v.stride(-1) == 1, "decode_attention_rope: k/v layout"
    assert cos_sin.dtype == torch.float32 and cos_sin.stride(-1) == 1 and cos_sin.shape[-1] == dim
    assert positions.shape == (t,) and slot_mapping.shape == (t,) and k_cache.shape[1] == hk
    return _launch(q, (k, v, positions, cos_sin, slot_mapping), k_cache, v_cache, block_tables, seq_lens,
                   query_start_loc, scale, sliding_window, num_splits, block_n, num_warps, out, early_reads)
