"""Round-to-nearest quantization into the ember format: the baseline GPTQ is measured against.

Per scale group and output column, a few clipping ratios are tried and the one with the lowest squared
error (after rounding the scale to fp16, as stored) is kept."""
from __future__ import annotations

import torch

from ember.quant.format import QuantizedTensor, make_segments, pack
from ember.quant.hadamard import block_hadamard

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)


def _quantize_groups(w: torch.Tensor, bits: int, sym: bool, ratio: float):
    """w (N, G, g) float32 -> codes (N, G, g) int64, scales (N, G) fp16-rounded, zeros (N, G) | None."""
    maxq = (1 << bits) - 1
    if sym:
        amax = w.abs().amax(-1) * ratio
        s = (2 * amax / maxq).to(torch.float16).float()
        z = torch.full_like(s, float(1 << (bits - 1)))
    else:
        lo, hi = w.amin(-1).clamp(max=0) * ratio, w.amax(-1).clamp(min=0) * ratio
        s = ((hi - lo) / maxq).to(torch.float16).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-lo / s).clamp(0, maxq)
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero group: any scale, codes = zero
    q = torch.round(w / s[..., None] + z[..., None]).clamp(0, maxq)
    return q, s, (None if sym else z)


def _quantize_segment(w: torch.Tensor, bits: int, g: int, sym: bool):
    """w (N, L) -> codes (N, L), scales (L/g, N), zeros (L/g, N) | None with the best clip per group."""
    N, L = w.shape
    wg = w.float().reshape(N, L // g, g)
    best = None
    for ratio in CLIP_RATIOS:
        q, s, z = _quantize_groups(wg, bits, sym, ratio)
        zz = z if z is not None else torch.full_like(s, float(1 << (bits - 1)))
        err = ((q - zz[..., None]) * s[..., None] - wg).pow(2).sum(-1)  # (N, G)
        if best is None:
            best = [err, q, s, z]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better[..., None], q, best[1])
        best[2] = torch.where(better, s, best[2])
        if z is not None:
            best[3] = torch.where(better, z, best[3])
    _, q, s, z = best
    return q.reshape(N, L), s.T, (None if z is None else z.T)


def rtn_quantize(W: torch.Tensor, bits: int | list[tuple[int, int, int]], group_size: int = 128,
                 sym: bool = True, had: int = 0) -> QuantizedTensor:
    """Quantize W (N, K) by round-to-nearest. `bits` is one width for the whole matrix (with
    `group_size`) or a segment list [(k_len, bits, group_size), ...]. `had` > 0 rotates the input axis
    first (the stored weight approximates W H). No permutation."""
    K = W.shape[1]
    spec = [(K, bits, group_size)] if isinstance(bits, int) else list(bits)
    make_segments(spec)  # validates the spec before any work
    w = block_hadamard(W.float(), had)
    codes, scales, zeros, k0 = [], [], [], 0
    for k_len, b, g in spec:
        q, s, z = _quantize_segment(w[:, k0:k0 + k_len], b, g, sym)
        codes.append(q)
        scales.append(s)
        zeros.append(z)
        k0 += k_len
    zero_t = None if sym else torch.cat(zeros, 0).to(torch.uint8)
    return pack(torch.cat(codes, 1).to(torch.int32), torch.cat(scales, 0).to(torch.float16), zero_t, spec,
                perm=None, had=had)
