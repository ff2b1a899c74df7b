"""GPTQ into the ember format: act-order, mixed-width segments, optional Hadamard rotation, MSE clipping.

One call quantizes one weight W (N, K) under several `QuantSpec`s at once (they share the rotation, hence
the Hessian, its permutation and its inverse): the measure stage scores a dozen settings for the price of
one column loop; the quantize stage passes one spec and asks for the packed tensor.

Steps (Frantar et al., GPTQ; act-order and lazy block updates as in its reference code):
  1. rotate: W' = W H_b, H' = H_b^T H H_b (H_b block Hadamard, symmetric, orthonormal);
  2. act-order: sort inputs by diag(H') descending (the first, most important, get a mix's widest bits);
  3. damp (DAMP times the mean diagonal), U = upper Cholesky factor of H'^-1;
  4. columns in blocks of 128: quantize a column, spread its error over the later columns of the block
     (err / U[i, i] times U[i, i:]), then push the block's errors to all later columns in one matmul.
A scale group's scale/zero are chosen when its first column is reached, from the group's updated weights,
by trying clipping ratios and keeping the one with the least (Hessian-diagonal-weighted) squared error.
Error reported: tr(dW H dW^T) (the output error energy on the calibration inputs), per output row and in
total, and relative to tr(W H W^T)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ember.quant.format import QuantizedTensor, make_segments, pack
from ember.quant.hadamard import block_hadamard

BLOCK = 128  # lazy-update block on the GPU (block_size)
BLOCK_CPU = 32
DAMP = 0.05  # of the mean Hessian diagonal; 0.03-0.1 gave lower held-out error than 0.01 (converter-notes.md)
# Clipping ratios tried per scale group: low widths profit from clipping harder.
CLIP = {2: (1.0, .95, .9, .85, .8, .75, .7, .65, .6, .55, .5), 3: (1.0, .95, .9, .85, .8, .75, .7, .65, .6),
        4: (1.0, .95, .9, .85, .8, .75, .7), 5: (1.0, .95, .9, .85, .8), 6: (1.0, .95, .9, .85), 8: (1.0, .95, .9)}


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one linear: segments (k_len, bits, group_size) in act-order (permuted) input order,
    the Hadamard block size (0 = none), and asymmetric zero points (stored qzeros) or symmetric."""

    segments: tuple[tuple[int, int, int], ...]
    had: int = 0
    asym: bool = False

    def stored_bits(self, n_out: int) -> int:
        """Exact stored bits as QuantizedTensor.stored_bits() counts them (act-order: perm always stored)."""
        K = sum(s[0] for s in self.segments)
        G = sum(s[0] // s[2] for s in self.segments)
        bits = sum(s[0] * s[1] for s in self.segments) * n_out + G * n_out * (16 + (8 if self.asym else 0))
        return bits + 32 * K + 32 * 6 * len(self.segments) + (32 if self.had else 0)

    def bpw(self, n_out: int) -> float:
        return self.stored_bits(n_out) / (n_out * sum(s[0] for s in self.segments))

    def describe(self) -> str:
        segs = "+".join(f"{k}x{b}b/g{g}" for k, b, g in self.segments)
        return f"{segs}{' had' + str(self.had) if self.had else ''}{' asym' if self.asym else ''}"


@dataclass
class GPTQResult:
    spec: QuantSpec
    error: float  # tr(dW H dW^T) with the un-damped Hessian
    rel_error: float  # error / tr(W H W^T)
    row_errors: torch.Tensor  # (N,) float64 on CPU: each output row's share of `error`
    qt: QuantizedTensor | None = None  # when codes were asked for


def rotate_hessian(H: torch.Tensor, had: int) -> torch.Tensor:
    """H' = H_b^T H H_b for inputs x' = x H_b (H symmetric, H_b symmetric)."""
    if not had:
        return H
    return block_hadamard(block_hadamard(H, had).T.contiguous(), had)


def inverse_cholesky(H: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag) I)^-1 (float64 math, float32 result). The damping
    grows tenfold until the factorization succeeds (a nearly singular Hessian from little data)."""
    H = H.double()
    mean = float(H.diagonal().mean()) or 1.0
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H + (damp * 10 ** attempt) * mean * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U.float()
    raise RuntimeError("the Hessian stayed singular after damping; is the calibration data degenerate?")


def _column_tables(specs: list[QuantSpec], K: int, device) -> tuple[torch.Tensor, dict]:
    """maxq (C, K) per candidate and input; starts[k] = [(g, asym, idx (c',), bits (c',))] of groups
    beginning at permuted input k."""
    maxq = torch.empty(len(specs), K)
    starts: dict[int, dict[tuple[int, bool], list[tuple[int, int]]]] = {}
    for c, spec in enumerate(specs):
        k = 0
        for k_len, bits, g in spec.segments:
            maxq[c, k:k + k_len] = (1 << bits) - 1
            for k0 in range(k, k + k_len, g):
                starts.setdefault(k0, {}).setdefault((g, spec.asym), []).append((c, bits))
            k += k_len
    table = {k: [(g, asym, torch.tensor([c for c, _ in v], device=device), [b for _, b in v])
                 for (g, asym), v in sorted(d.items())] for k, d in starts.items()}
    return maxq.to(device), table


def block_size(device: torch.device) -> int:
    """Lazy-update block length: BLOCK on the GPU (each block costs launches); BLOCK_CPU on the CPU, where the
    in-block update W[:, i+1:] -= err * U[i, i+1:] is the bulk of the time and shrinks with the block
    (the block-level matmul updates do the same total work at any length)."""
    return BLOCK_CPU if device.type == "cpu" else BLOCK


def _blocks(specs: list[QuantSpec], K: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """Lazy-update blocks [i1, i2) of at most `block` columns where possible. A group's scale is fit when its
    first column comes up, from the group's current columns: exact if every earlier column's error already
    reached all of them, i.e. if the group starts a block or lies inside one. So a block may not end inside
    a group that starts inside it (it is cut at that group's start instead); a group that starts a block
    may run on into later blocks."""
    groups = set()
    for spec in specs:
        k = 0
        for k_len, _bits, g in spec.segments:
            groups.update((s, s + g) for s in range(k, k + k_len, g))
            k += k_len
    out, i1 = [], 0
    while i1 < K:
        i2 = min(i1 + block, K)
        i2 = min([s for s, e in groups if i1 < s < i2 < e], default=i2)
        out.append((i1, i2))
        i1 = i2
    return out


def _fit_group(w: torch.Tensor, d: torch.Tensor, bits: list[int], asym: bool):
    """Scale and zero for groups w (c', N, g) of widths bits (c',), weighting squared errors by d (g,).
    Returns s, z (c', N) float32 (s rounded to fp16 as stored). Tries each width's clipping ratios."""
    maxq = torch.tensor([(1 << b) - 1 for b in bits], dtype=w.dtype, device=w.device)[:, None, None]
    half = (maxq + 1) / 2  # symmetric zero point 2^(b-1)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)  # (c', N, 1)
    best_err = best_s = best_z = None
    ratios = sorted({r for b in bits for r in CLIP[b]}, reverse=True)
    for r in ratios:
        if asym:
            a, b_ = lo.clamp(max=0) * r, hi.clamp(min=0) * r
            s = ((b_ - a) / maxq).half().float()
            s = torch.where(s > 0, s, torch.ones_like(s))
            z = torch.round(-a / s).clamp(torch.zeros_like(maxq), maxq)
        else:  # the largest magnitude lands on the grid's edge of its own sign: [-2^(b-1), 2^(b-1) - 1]
            s = torch.maximum(-lo / half, hi / (half - 1).clamp(min=1)) * r
            s = s.half().float()
            s = torch.where(s > 0, s, torch.ones_like(s))
            z = half.expand_as(s)
        q = torch.clamp(torch.round(w / s + z), torch.zeros_like(maxq), maxq)
        err = (((q - z) * s - w).pow(2) * d).sum(-1, keepdim=True)  # (c', N, 1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s[..., 0], best_z[..., 0]


@contextmanager
def _cpu_threads(device: torch.device, n: int = 1):
    """The column loop is thousands of small ops: on CPU, one thread beats several (OpenMP threads that
    wait on each other cost more than they add, badly so on a busy machine)."""
    if device.type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, specs: list[QuantSpec], want_codes: bool = False,
                  damp: float = DAMP) -> list[GPTQResult]:
    """Quantize W (N, K) with input Hessian H (K, K) = sum x^T x under each spec (all with the same `had`).
    With want_codes the results carry the packed QuantizedTensor. Work is float32 on W's device."""
    with _cpu_threads(W.device), torch.no_grad():
        return _gptq(W, H, specs, want_codes, damp)


def _gptq(W: torch.Tensor, H: torch.Tensor, specs: list[QuantSpec], want_codes: bool,
          damp: float) -> list[GPTQResult]:
    had = specs[0].had
    if any(s.had != had for s in specs):
        raise ValueError("gptq_quantize: all specs of one call must share the Hadamard size")
    N, K = W.shape
    dev = W.device
    Wr = block_hadamard(W.float(), had)  # (N, K) = W H_b
    Hr = rotate_hessian(H.float().to(dev), had)
    diag = Hr.diagonal()
    perm = torch.argsort(diag, descending=True, stable=True)  # act-order
    Wp, Hp = Wr[:, perm].contiguous(), Hr[perm][:, perm].contiguous()
    dead = Hp.diagonal() == 0  # inputs never seen: keep them quantizable without dividing by zero
    Hd = Hp.clone()
    Hd.diagonal()[dead] = 1.0
    U = inverse_cholesky(Hd, damp)  # (K, K) upper
    dw = Hd.diagonal().clamp(min=1e-12)  # per-input weight of the clipping error
    C = len(specs)
    maxq, starts = _column_tables(specs, K, dev)
    Q = Wp.expand(C, N, K).clone()  # (C, N, K): working weights, then the dequantized result
    s_cur = torch.ones(C, N, device=dev)
    z_cur = torch.zeros(C, N, device=dev)
    codes = torch.empty(C, N, K, dtype=torch.uint8, device=dev) if want_codes else None
    groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in specs]  # per spec: (s, z) per group
    for i1, i2 in _blocks(specs, K, block_size(dev)):
        W1 = Q[:, :, i1:i2]  # a view: updates land in Q
        E1 = torch.empty(C, N, i2 - i1, device=dev)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            k = i1 + i
            for g, asym, idx, bits in starts.get(k, ()):
                s, z = _fit_group(Q[idx, :, k:k + g], dw[k:k + g], bits, asym)  # may reach past the block
                s_cur[idx], z_cur[idx] = s, z
                if want_codes:
                    for j, c in enumerate(idx.tolist()):
                        groups[c].append((s[j], z[j]))
            w = W1[:, :, i]  # (C, N)
            q = torch.minimum(torch.round(w / s_cur + z_cur).clamp(min=0), maxq[:, k:k + 1])
            dq = (q - z_cur) * s_cur
            err = (w - dq) / U1[i, i]
            W1[:, :, i + 1:] -= err[:, :, None] * U1[i, i + 1:]
            W1[:, :, i] = dq
            E1[:, :, i] = err
            if want_codes:
                codes[:, :, k] = q.to(torch.uint8)
        if i2 < K:
            Q[:, :, i2:] -= E1 @ U[i1:i2, i2:]
    base = float(((Wp @ Hp) * Wp).sum().clamp(min=1e-30))
    out = []
    for c, spec in enumerate(specs):
        D = Wp - Q[c]
        rows = ((D @ Hp) * D).sum(-1).double().cpu()  # (N,)
        err = float(rows.sum())
        qt = _pack(codes[c], groups[c], spec, perm, N) if want_codes else None
        out.append(GPTQResult(spec, err, err / base, rows, qt))
    return out


def _pack(codes: torch.Tensor, groups: list, spec: QuantSpec, perm: torch.Tensor, N: int) -> QuantizedTensor:
    scales = torch.stack([s for s, _ in groups]).half()  # (G, N)
    zeros = torch.stack([z for _, z in groups]).round().to(torch.uint8) if spec.asym else None
    make_segments(list(spec.segments))
    return pack(codes.to(torch.int32), scales, zeros, list(spec.segments), perm=perm.to(torch.int32),
                had=spec.had).to("cpu")
