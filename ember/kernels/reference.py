"""Plain PyTorch versions of every kernel. They define what the Triton kernels must compute, run on any
device, and are what ember uses on CPU. Shapes are in the comments; math is done in float32 where the
kernels do it in float32 (norm statistics, softmax), then cast back to the input dtype."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (T, H), weight: (H,)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """residual <- x + residual; returns (rms_norm(residual), residual). x, residual: (T, H)."""
    r = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(r, weight, eps), r


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # x: (T, 2I) = [gate | up] -> (T, I)
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def matmul_epilogue(y: torch.Tensor, epi, dtype: torch.dtype) -> torch.Tensor:
    """The quantized matmul's fused epilogue `epi` (kernels/epilogue.Epilogue) on its fp32 products y (M, N):
    rms_in (M,): x was h * gamma of un-normalized rows h, y *= rsqrt(rms_in + eps) (the RMSNorm's 1/rms);
    y is then rounded to dtype; residual (M, N) <- h = y + residual, returns h * gamma and adds mean(h^2)
    into rms_out (M,); or glu: returns silu(gate) * up of y = [gate | up]; else returns y."""
    if epi.rms_in is not None:
        y = y * torch.rsqrt(epi.rms_in + epi.eps)[:, None]
    y = y.to(dtype)
    if epi.glu:
        return silu_and_mul(y)
    if epi.residual is None:
        return y
    h = (y.float() + epi.residual.float()).to(dtype)
    epi.residual.copy_(h)
    epi.rms_out.add_(h.float().pow(2).mean(-1))  # in place (Epilogue is frozen)
    return (h.float() * epi.gamma.float()).to(dtype)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    """Rotary embedding, "rotate half" convention (HF Llama). q: (T, Hq, D), k: (T, Hk, D),
    positions: (T,), cos_sin: (max_pos, D) = [cos(D/2) | sin(D/2)] in float32. Returns new (q, k)."""
    cs = cos_sin[positions]  # (T, D)
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x):
        xf = x.float()
        x1, x2 = xf[..., :half], xf[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write new keys/values into their pages. k, v: (T, Hk, D); caches: (P, Hk, page, D);
    slot_mapping: (T,) = page * page_size + offset. A negative slot (a padding token) is skipped."""
    keep = slot_mapping >= 0
    k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    page_size = k_cache.shape[2]
    pages, offs = slot_mapping // page_size, slot_mapping % page_size
    k_cache[pages, :, offs] = k.to(k_cache.dtype)
    v_cache[pages, :, offs] = v.to(v_cache.dtype)


def rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping):
    """rope(q, k) then store_kv(rotated k, v); returns the rotated (q, k). (The Triton one is one kernel.)"""
    q, k = rope(q, k, positions, cos_sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def decode_slots(pos: torch.Tensor, tables: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's metadata: pos (B,) int64, tables (B, pages) int32 -> the new tokens' cache slots
    (B,) int64 and seq_lens (B,) int32."""
    slot = tables.gather(1, (pos // page).unsqueeze(1)).squeeze(1).long() * page + pos % page
    return slot, (pos + 1).to(torch.int32)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len positions of one sequence: cache (P, Hk, page, D) -> (Hk, seq_len, D)."""
    page_size = cache.shape[2]
    n_pages = (seq_len + page_size - 1) // page_size
    pages = cache[block_table[:n_pages].long()]  # (n, Hk, page, D)
    return pages.transpose(0, 1).reshape(cache.shape[1], n_pages * page_size, -1)[:, :seq_len]


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys/values (which already hold the
    new tokens). q: (T, Hq, D); block_tables (B, max_pages); seq_lens, query_start_loc host lists or tensors.
    The query at position p sees keys at positions (p - window, p] (all of [0, p] without a window).
    Returns (T, Hq, D)."""
    seq_lens = [int(s) for s in seq_lens]
    qsl = [int(s) for s in query_start_loc]
    out = torch.empty_like(q)
    hq, hk = q.shape[1], k_cache.shape[1]
    for b, seq_len in enumerate(seq_lens):
        qs, qe = qsl[b], qsl[b + 1]
        if qe == qs:
            continue
        k = gather_kv(k_cache, block_tables[b], seq_len).float()  # (Hk, S, D)
        v = gather_kv(v_cache, block_tables[b], seq_len).float()
        k = k.repeat_interleave(hq // hk, dim=0)  # (Hq, S, D)
        v = v.repeat_interleave(hq // hk, dim=0)
        qb = q[qs:qe].transpose(0, 1).float()  # (Hq, n, D)
        n = qe - qs
        qpos = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]
        kpos = torch.arange(seq_len, device=q.device)[None, :]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        scores = (qb @ k.transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        out[qs:qe] = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).to(q.dtype)
    return out


def rope_cos_sin(head_dim: int, max_pos: int, theta: float, scaling=None) -> torch.Tensor:
    """(max_pos, head_dim) float32 table [cos | sin] for rope(); scaling is a config.RopeScaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None and scaling.kind == "factors":
        inv_freq = inv_freq / torch.tensor(scaling.freq_factors, dtype=torch.float64)
    elif scaling is not None and scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None and scaling.kind == "llama3":
        # Llama 3.1: long wavelengths are stretched by `factor`, short ones kept, the middle band blended.
        old = scaling.original_max_position_embeddings
        low_wl, high_wl = old / scaling.low_freq_factor, old / scaling.high_freq_factor
        wl = 2 * math.pi / inv_freq
        smooth = (old / wl - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = torch.where(wl > low_wl, inv_freq / scaling.factor, torch.where(wl < high_wl, inv_freq, blended))
    t = torch.arange(max_pos, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()


def fp8_quantize_act(x: torch.Tensor, perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> a8 (M, K) float8_e4m3fn, sa (K/128, M) fp32: each run of 128 inputs (in permuted order
    when perm is given) divided by its largest magnitude / 448 and rounded to e4m3 (qmatmul_fp8.py)."""
    M, K = x.shape
    xp = (x if perm is None else x[:, perm.long()]).float().view(M, K // 128, 128)
    amax = xp.abs().amax(-1).clamp_min(1e-20)
    s = amax / torch.full_like(amax, 448.0)  # (M, K/128); tensor / tensor: IEEE division on every device
    # (on CUDA, torch divides by a Python scalar as a multiply by its reciprocal, one ulp off the kernel's)
    a8 = (xp / s[..., None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(M, K)
    return a8, s.T.contiguous()


def qmatmul_fp8(x: torch.Tensor, qt, rotated: bool = False) -> torch.Tensor:
    """(M, K) -> (M, N) float32: what the fp8 prefill path computes, x rotated (unless `rotated` says it
    already is), permuted and rounded to e4m3 per 128 inputs, times the exact weights (q - z) * s. The fp8
    path's weight operand, q - z as e4m3, is quant.format.centered_codes."""
    from ember.quant.format import centered_codes, group_rows
    from ember.quant.hadamard import block_hadamard

    xr = x if rotated else block_hadamard(x, qt.had)  # in x's dtype, as the kernels see it
    a8, sa = fp8_quantize_act(xr, qt.perm)
    a = a8.float() * sa.T.repeat_interleave(128, dim=1)
    w = centered_codes(qt) * qt.scales.float()[group_rows(qt)].T  # exact weights, permuted, still rotated
    y = a @ w.T
    return y + qt.bias.float() if qt.bias is not None else y
