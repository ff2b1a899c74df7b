"""Triton kernels of the quantized matmul y = x @ Wq^T over the ember format (docs/format.md).

One program per (block of BN output columns, K split, block of BM rows). A split lies inside one segment;
its metadata row (qmatmul.py, `split_meta`) gives its first permuted input, tile count, width, group size,
first plane rows and scale row, so the grid is fixed and nothing is read back on the host (graph-safe). A
matrix of one segment computes that row from the split index instead (UNIFORM, `_split_fields`).

Decoding a plane of width P: a (R = 2P, BN) word tile shifted by j*P for j < V = 32/P gives a (V, R, BN)
tile whose element (j, t) is input j*R + t of the block of 64. Integers become floats with the "magic
number" trick: (v | 0x4B000000) read as float32 is 2^23 + v, and subtracting 2^23 + z gives v - z exactly,
so the zero point costs nothing per weight (planes combine as (P1 - z) + 2^p1 * P2). The 3-bit plane (6 rows
a block, docs/format.md) is read as three (2, BN) row groups, tensor sizes being powers of two, and the four
codes kept in its spare bits are gathered by `spare3`; its many-row decode gathers each input's word
(`_codes64_3`).

Inner loops (constexpr USE_DOT):
- FMA, one row: per plane a (V, R, BN) product with x laid out the same way, reduced over V in registers
  (each thread owns whole columns), times the group scale; no reshape, no shared memory.
- DOT, 2+ rows: planes reshaped to (64, BN), combined, cast to the activation dtype, tl.dot; the (BM, BN)
  result is scaled per group.
Groups of 32 (HAS_G32) split a block in halves: elements j < V/2 of every plane are inputs 0..31.
Split-K and the store: qmatmul_store.py.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from ember.kernels import pdl
from ember.kernels.qmatmul_h2 import plane2_rows, plane_part3_h2, plane_part_h2, spare3
from ember.kernels.qmatmul_store import store_tile

MAGIC = tl.constexpr(8388608.0)  # 2^23
# The one-row loop can sum each tile's word rows into one (1, BN) fp32 accumulator instead of keeping one per row
# across the loop ((2P, BN): 32 registers a thread at 4 bits and 4 columns). H100, call M2 (docs/benchmarks.md),
# batch-1 qmatmul alone: 14336x4096 at 5 / 6 / 8 bits 19.5 / 21.9 / 27.7 -> 17.4 / 19.6 / 24.2 us, gate/up at
# those widths unchanged; at 4 bits down 13.7 -> 14.6 us and gate/up 25.8 -> 28.8 us, the 8B 4-bit decode
# 516 -> 461 tok/s (the packed-half loop then keeps half of a tile's weight loads until after its first
# multiply-adds, offline SASS). So: 1 = every width, 0 = none, 2 (default) = the widths it helped, 5, 6
# and 8 bits (EMBER_ROW_SUM, read at import).
ROW_SUM = tl.constexpr(int(os.environ.get("EMBER_ROW_SUM", "2")))


@triton.jit
def _decode(q_ptr, row, offs_n, n_mask, N, P: tl.constexpr):
    """(2P, BN) words at rows row.. -> (32/P, 2P, BN) float32 2^23 + value; [j, t] is input j*2P + t."""
    V: tl.constexpr = 32 // P
    R: tl.constexpr = 2 * P
    w = tl.load(q_ptr + (row + tl.arange(0, R))[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    v = (w[None, :, :] >> (tl.arange(0, V) * P)[:, None, None]) & ((1 << P) - 1)
    return (v | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _scale_zero(s_ptr, z_ptr, grow, offs_n, n_mask, N, HAS_ZEROS: tl.constexpr):
    """Scale (BN,) and zero point (BN,) (0 when symmetric: the constexpr Z0 is used) of scale row grow."""
    s = tl.load(s_ptr + grow * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(z_ptr + grow * N + offs_n, mask=n_mask, other=0).to(tl.float32)
    else:
        z = tl.zeros(s.shape, tl.float32)
    return s, z


@triton.jit
def _plane_words(q_ptr, row, offs_n, n_mask, N, P: tl.constexpr):
    """The (2P, BN) int32 words of one plane of one block of 64 (zeros where n_mask is off)."""
    return tl.load(q_ptr + (row + tl.arange(0, 2 * P))[:, None] * N + offs_n[None, :], mask=n_mask[None, :],
                   other=0)


@triton.jit
def _rows(q_ptr, row, offs_n, n_mask, N, ROWS: tl.constexpr):
    """(ROWS, BN) int32 words of rows row .. row + ROWS (zeros where n_mask is off)."""
    return tl.load(q_ptr + (row + tl.arange(0, ROWS))[:, None] * N + offs_n[None, :], mask=n_mask[None, :],
                   other=0)


@triton.jit
def _plane_part(w, x_ptr, perm_ptr, kb, z_lo, z_hi, ones, BN: tl.constexpr, P: tl.constexpr,
                WITH_ZERO: tl.constexpr, Z0: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
                HAS_G32: tl.constexpr, ROW0: tl.constexpr = 0, ROWS: tl.constexpr = 0, SLOTS: tl.constexpr = 0):
    """Partial sums (ROWS, BN) of x * (plane - zero) over the fields of word rows ROW0 .. ROW0 + ROWS of one
    plane of one block of 64 (default: all 2P rows), for inputs 0..31 (lo) and 32..63 (hi; only when HAS_G32,
    else everything is in lo).

    Each 16-bit half of a word holds SLOTS fields (default 16 // P; the 3-bit plane: 5, or 1 for its spare-bit
    codes): field j at bit S = j*P of the low half of row t is input j*2P + t, the same field of the high half
    that input + 32 (docs/format.md). (half & (mask << S)) | magic is 2^23 + v * 2^S exactly (one LOP3), minus
    2^23 + z * 2^S gives (v - z) * 2^S; the 2^-S goes on x, which each thread loads once for all its columns."""
    R: tl.constexpr = 2 * P
    NR: tl.constexpr = ROWS if ROWS > 0 else R
    H: tl.constexpr = SLOTS if SLOTS > 0 else 16 // P
    w_hi = w >> 16
    part_lo = tl.zeros((NR, BN), tl.float32)
    part_hi = tl.zeros((NR, BN), tl.float32)
    for j in tl.static_range(2 * H):  # low half's fields, then the high half's
        S = (j % H) * P
        if j < H:
            h = w
        else:
            h = w_hi
        # the mask comes from the runtime `ones` (== -1) so it stays in a register: with two immediates
        # ptxas re-materializes one constant per LOP3
        f = ((h & ((ones & ((1 << P) - 1)) << S)) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + v*2^S
        if WITH_ZERO:
            if HAS_ZEROS:
                if HAS_G32 and j >= H:
                    f = f - (z_hi * (1 << S) + MAGIC)[None, :]
                else:
                    f = f - (z_lo * (1 << S) + MAGIC)[None, :]
            else:
                f = f - (MAGIC + Z0 * (1 << S))
        else:
            f = f - MAGIC
        idx = kb + (j % H) * R + (j // H) * 32 + ROW0 + tl.arange(0, NR)
        if HAS_PERM:
            idx = tl.load(perm_ptr + idx)
        xj = tl.load(x_ptr + idx).to(tl.float32)  # (NR,)
        xj = xj * (1.0 / (1 << S))
        if HAS_G32 and j >= H:
            part_hi += xj[:, None] * f
        else:
            part_lo += xj[:, None] * f
    return part_lo, part_hi


@triton.jit
def _acc(a, part, s, RS: tl.constexpr):
    """a + part * s over a tile's word rows: part (R, BN) fp32 partial sums, s (BN,) their scale; a is (R, BN),
    or (1, BN) with RS (ROW_SUM for this width: the rows summed first, in the thread that owns the column)."""
    if RS:
        out = a + (tl.sum(part, axis=0) * s)[None, :]
    else:
        out = a + part * s[None, :]
    return out


@triton.jit
def _tile_fma(a1, a2, zc, w1, w1b, w2, s_lo, z_lo, s_hi, z_hi, x_ptr, perm_ptr, kb, ones, BN: tl.constexpr,
              P1: tl.constexpr, P2: tl.constexpr, Z0: tl.constexpr, HAS_ZEROS: tl.constexpr,
              HAS_PERM: tl.constexpr, HAS_G32: tl.constexpr, H2: tl.constexpr, RS: tl.constexpr):
    """Accumulate one block of 64 inputs (plane words w1 / w2, the 3-bit plane's rows in w1, w1b, w2; group
    scales) into a1 / a2; with H2 (packed halves, qmatmul_h2.py) the first plane is centred at Z0 and zc
    collects (z - Z0) * s * sum(x). RS: a1 / a2 are single accumulator rows (_loop_fma, ROW_SUM)."""
    if H2:
        if P1 == 3:  # without G32, lo holds both halves (summed in fp16)
            lo, hi, sx_lo, sx_hi = plane_part3_h2(w1, w1b, w2, x_ptr, perm_ptr, kb, ones, BN, Z0, HAS_PERM,
                                                  HAS_ZEROS, HAS_G32, H2 == 2)
        else:
            lo, hi, sx_lo, sx_hi = plane_part_h2(w1, w2, x_ptr, perm_ptr, kb, ones, BN, P1, P2, Z0, HAS_PERM,
                                                 HAS_ZEROS, H2 == 2)
            if not HAS_G32:
                lo = lo + hi
        if HAS_G32:
            a1 = _acc(_acc(a1, lo, 16.0 * s_lo, RS), hi, 16.0 * s_hi, RS)
        else:
            a1 = _acc(a1, lo, 16.0 * s_lo, RS)
        if HAS_ZEROS:
            zc += (z_lo - Z0) * s_lo * sx_lo + (z_hi - Z0) * s_hi * sx_hi
    elif P1 == 3:  # the 3-bit plane by row groups, then the codes in the spare bits
        for u in tl.static_range(4):
            if u == 0:
                w = w1
            elif u == 1:
                w = w1b
            elif u == 2:
                w = w2
            else:
                w = spare3(w1, w1b, w2)
            lo, hi = _plane_part(w, x_ptr, perm_ptr, kb, z_lo, z_hi, ones, BN, 3, True, Z0, HAS_ZEROS, HAS_PERM,
                                 HAS_G32, 2 * u if u < 3 else 30, 2, 5 if u < 3 else 1)
            a1 = _acc(a1, lo, s_lo, RS)
            if HAS_G32:
                a1 = _acc(a1, hi, s_hi, RS)
    else:
        lo, hi = _plane_part(w1, x_ptr, perm_ptr, kb, z_lo, z_hi, ones, BN, P1, True, Z0, HAS_ZEROS, HAS_PERM,
                             HAS_G32)
        a1 = _acc(a1, lo, s_lo, RS)
        if HAS_G32:
            a1 = _acc(a1, hi, s_hi, RS)
        if P2 > 0:
            lo, hi = _plane_part(w2, x_ptr, perm_ptr, kb, z_lo, z_hi, ones, BN, P2, False, Z0, HAS_ZEROS,
                                 HAS_PERM, HAS_G32)
            a2 = _acc(a2, lo, s_lo * (1 << P1), RS)
            if HAS_G32:
                a2 = _acc(a2, hi, s_hi * (1 << P1), RS)
    return a1, a2, zc


@triton.jit
def _tile_load(q_ptr, s_ptr, z_ptr, t, inv_g, q1row, q2row, srow, kk0, offs_n, n_mask, N, P1: tl.constexpr,
               P2: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G32: tl.constexpr, H2: tl.constexpr):
    """Plane words and group scales / zeros of tile t of a split (H2: the second plane lined up with the
    first, qmatmul_h2.plane2_rows; the 3-bit plane as rows 0-1, 2-3, 4-5 in w1, w1b, w2, else w1b is unused).
    inv_g: 1 / group size (_group)."""
    if P1 == 3:
        w1 = _rows(q_ptr, q1row + t * 6, offs_n, n_mask, N, 2)
        w1b = _rows(q_ptr, q1row + t * 6 + 2, offs_n, n_mask, N, 2)
        w2 = _rows(q_ptr, q1row + t * 6 + 4, offs_n, n_mask, N, 2)
    else:
        w1 = _plane_words(q_ptr, q1row + t * (2 * P1), offs_n, n_mask, N, P1)
        w1b = w1
        if H2 and P2 > 0:
            w2 = plane2_rows(q_ptr, q2row + t * (2 * P2), offs_n, n_mask, N, P1, P2)
        elif P2 > 0:
            w2 = _plane_words(q_ptr, q2row + t * (2 * P2), offs_n, n_mask, N, P2)
        else:
            w2 = w1
    s_lo, z_lo = _scale_zero(s_ptr, z_ptr, srow + _group(kk0 + t * 64, inv_g), offs_n, n_mask, N, HAS_ZEROS)
    if HAS_G32:
        s_hi, z_hi = _scale_zero(s_ptr, z_ptr, srow + _group(kk0 + t * 64 + 32, inv_g), offs_n, n_mask, N, HAS_ZEROS)
    else:
        s_hi, z_hi = s_lo, z_lo
    return w1, w1b, w2, s_lo, z_lo, s_hi, z_hi


@triton.jit
def _group(k, inv_g):
    """k // g for k a multiple of 32 and g (32 or a multiple of 64) given as the fp32 1/g: (k + 16) / g lies
    at least 16/g from an integer, far more than fp32 rounding, so truncation is exact. Three instructions
    instead of an integer division per tile (the divisor is a runtime value)."""
    return ((k + 16).to(tl.float32) * inv_g).to(tl.int32)


@triton.jit
def _loop_fma(x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, k0, nt, g, q1row, q2row, srow, kk0, offs_n, n_mask, N, ones,
              BN: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, HAS_ZEROS: tl.constexpr,
              HAS_PERM: tl.constexpr, HAS_G32: tl.constexpr, PDL: tl.constexpr, H2: tl.constexpr,
              STAGES: tl.constexpr):
    """One row of x over one split -> (1, BN) float32. Planes combine as (P1 - z) + 2^p1 * P2.
    H2 (0 off, 1 plain Triton, 2 PTX): packed-half decode (qmatmul_h2.py) of 2- to 6-bit codes.
    Tile 0 is peeled off the loop and its words and scales are loaded before pdl.wait: weights are never
    written by an earlier kernel, so under PDL their load overlaps the previous kernel's tail (the small
    matrices give a program one or two tiles). STAGES (the launch's stages, qmatmul.py): the loop's software
    pipelining depth through shared memory; 1 = none, each tile's words loaded into registers just before use
    (a hand-pipelined loop in registers took 184 registers instead of 72 for sm_90; the cp.async version keeps
    127 for 4 bits, offline)."""
    Z0: tl.constexpr = 1 << (P1 + P2 - 1)
    inv_g = 1.0 / g.to(tl.float32)  # scale rows by multiplication (_group)
    RS: tl.constexpr = (ROW_SUM == 1) or (ROW_SUM == 2 and (P2 > 0 or P1 == 8))  # ROW_SUM
    a1 = tl.zeros((1 if RS else 2 if P1 == 3 else 2 * P1, BN), tl.float32)
    a2 = tl.zeros((1 if RS or P2 == 0 else 2 * P2, BN), tl.float32)
    zc = tl.zeros((BN,), tl.float32)
    first = 0
    if PDL == 2:
        w1, w1b, w2, s_lo, z_lo, s_hi, z_hi = _tile_load(q_ptr, s_ptr, z_ptr, 0, inv_g, q1row, q2row, srow, kk0, offs_n,
                                                    n_mask, N, P1, P2, HAS_ZEROS, HAS_G32, H2)
        pdl.wait(PDL)
        a1, a2, zc = _tile_fma(a1, a2, zc, w1, w1b, w2, s_lo, z_lo, s_hi, z_hi, x_ptr, perm_ptr, tl.multiple_of(k0, 64),
                               ones, BN, P1, P2, Z0, HAS_ZEROS, HAS_PERM, HAS_G32, H2, RS)
        first = 1
    # STAGES > 1: Triton's pipeliner copies the words of the next STAGES - 1 tiles into shared memory
    # (cp.async) while this one is decoded, so a warp keeps loads in flight without holding them in registers
    for t in tl.range(first, nt, num_stages=STAGES):
        w1, w1b, w2, s_lo, z_lo, s_hi, z_hi = _tile_load(q_ptr, s_ptr, z_ptr, t, inv_g, q1row, q2row, srow, kk0, offs_n,
                                                    n_mask, N, P1, P2, HAS_ZEROS, HAS_G32, H2)
        a1, a2, zc = _tile_fma(a1, a2, zc, w1, w1b, w2, s_lo, z_lo, s_hi, z_hi, x_ptr, perm_ptr,
                               tl.multiple_of(k0 + t * 64, 64), ones, BN, P1, P2, Z0, HAS_ZEROS, HAS_PERM,
                               HAS_G32, H2, RS)
    y = tl.sum(a1, axis=0) - zc
    if P2 > 0:
        y += tl.sum(a2, axis=0)
    return y[None, :]


@triton.jit
def _codes64(q_ptr, t, q1row, q2row, offs_n, n_mask, N, BN: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr):
    """(64, BN) float32 2^23 + code of tile t of a split, rows in input order."""
    if P1 == 3:
        f = _codes64_3(q_ptr, q1row + t * 6, offs_n, n_mask, N)
    else:
        f = tl.reshape(_decode(q_ptr, q1row + t * (2 * P1), offs_n, n_mask, N, P1), (64, BN))
        if P2 > 0:
            f2 = tl.reshape(_decode(q_ptr, q2row + t * (2 * P2), offs_n, n_mask, N, P2), (64, BN))
            f += (f2 - MAGIC) * (1 << P1)
    return f


@triton.jit
def _codes64_3(q_ptr, row, offs_n, n_mask, N):
    """The 3-bit plane's (64, BN) float32 2^23 + code in input order (docs/format.md): input e of half h
    (e = 32h + q) is field q // 6 of row q % 6 for q < 30; for q = 30 + t its bit u is the spare bit 15 + 16h
    of row 2u + t. Each row of the tile gathers its word (the 6 words of a column are read ~10 times, from
    L1); used by the many-row paths, where the weights are read once per 16-64 rows of x."""
    e = tl.arange(0, 64)
    h = e // 32
    q = e % 32
    reg = q < 30
    r = tl.where(reg, q % 6, q - 30)
    sh = tl.where(reg, 16 * h + 3 * (q // 6), 15 + 16 * h)[:, None]
    ptr = q_ptr + (row + r)[:, None] * N + offs_n[None, :]
    w0 = tl.load(ptr, mask=n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
    extra = n_mask[None, :] & (~reg)[:, None]  # the spare-bit codes take bits 1 and 2 from rows 2 and 4 on
    w1 = tl.load(ptr + 2 * N, mask=extra, other=0).to(tl.uint32, bitcast=True)
    w2 = tl.load(ptr + 4 * N, mask=extra, other=0).to(tl.uint32, bitcast=True)
    v = ((w0 >> sh) & tl.where(reg, 7, 1)[:, None]) | (((w1 >> sh) & 1) << 1) | (((w2 >> sh) & 1) << 2)
    return (v.to(tl.int32, bitcast=True) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _loop_dot(x_ptr, stride_xm, offs_m, m_mask, q_ptr, s_ptr, z_ptr, perm_ptr, k0, nt, g, q1row, q2row, srow,
              kk0, offs_n, n_mask, N, BM: tl.constexpr, BN: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
              HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_G32: tl.constexpr, DOT_DT: tl.constexpr):
    """BM rows of x over one split -> (BM, BN) float32."""
    Z0: tl.constexpr = 1 << (P1 + P2 - 1)
    acc = tl.zeros((BM, BN), tl.float32)
    offs64 = tl.arange(0, 64)
    for t in range(nt):
        idx = tl.multiple_of(k0 + t * 64, 64) + offs64
        if HAS_PERM:
            idx = tl.load(perm_ptr + idx)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + idx[None, :], mask=m_mask[:, None], other=0.0)
        x = x.to(DOT_DT)
        f = _codes64(q_ptr, t, q1row, q2row, offs_n, n_mask, N, BN, P1, P2)
        s_lo, z_lo = _scale_zero(s_ptr, z_ptr, srow + (kk0 + t * 64) // g, offs_n, n_mask, N, HAS_ZEROS)
        c_lo = z_lo + (MAGIC if HAS_ZEROS else MAGIC + Z0)  # 2^23 + zero
        if HAS_G32:
            s_hi, z_hi = _scale_zero(s_ptr, z_ptr, srow + (kk0 + t * 64 + 32) // g, offs_n, n_mask, N, HAS_ZEROS)
            c_hi = z_hi + (MAGIC if HAS_ZEROS else MAGIC + Z0)
            lo = offs64 < 32
            w = (f - tl.where(lo[:, None], c_lo[None, :], c_hi[None, :])).to(DOT_DT)
            x_lo = tl.where(lo[None, :], x, 0.0).to(DOT_DT)
            acc += tl.dot(x_lo, w) * s_lo[None, :] + tl.dot((x - x_lo).to(DOT_DT), w) * s_hi[None, :]
        else:
            acc += tl.dot(x, (f - c_lo[None, :]).to(DOT_DT)) * s_lo[None, :]
    return acc


@triton.jit
def _split_fields(meta, uni, P1: tl.constexpr, P2: tl.constexpr, UNIFORM: tl.constexpr):
    """(k0, tiles, g, q1row, q2row, srow, kk0) of this program's split: the 8 int32 at `meta` (qmatmul.split_meta),
    or, UNIFORM (one segment covering K), computed from uni = (tiles a split, tiles of K, g): then the first
    weight load does not wait for a metadata round trip (which comes from DRAM in a decode step: the weights
    streamed since evict it from L2)."""
    if UNIFORM:
        tiles, kt, g = uni
        s = tl.program_id(1)
        k0 = s * tiles * 64
        nt = tl.minimum(tiles, kt - s * tiles)
        q1row = k0 * P1 // 32
        q2row = kt * 2 * P1 + k0 * P2 // 32  # the second plane follows the first over the whole segment
        srow = 0
        kk0 = k0
    else:
        k0, nt, g = tl.load(meta), tl.load(meta + 1), tl.load(meta + 3)
        q1row, q2row, srow, kk0 = tl.load(meta + 4), tl.load(meta + 5), tl.load(meta + 6), tl.load(meta + 7)
    return k0, nt, g, q1row, q2row, srow, kk0


@triton.jit
def _split(x_ptr, stride_xm, offs_m, m_mask, q_ptr, s_ptr, z_ptr, perm_ptr, meta, uni, offs_n, n_mask, N, ones,
           BM: tl.constexpr, BN: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, USE_DOT: tl.constexpr,
           HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_G32: tl.constexpr, DOT_DT: tl.constexpr,
           PDL: tl.constexpr, H2: tl.constexpr, STAGES: tl.constexpr, UNIFORM: tl.constexpr):
    """The partial sums (BM, BN) of this program's split (_split_fields), width P1 + P2."""
    k0, nt, g, q1row, q2row, srow, kk0 = _split_fields(meta, uni, P1, P2, UNIFORM)
    if USE_DOT:
        acc = _loop_dot(x_ptr, stride_xm, offs_m, m_mask, q_ptr, s_ptr, z_ptr, perm_ptr, k0, nt, g, q1row, q2row,
                        srow, kk0, offs_n, n_mask, N, BM, BN, P1, P2, HAS_ZEROS, HAS_PERM, HAS_G32, DOT_DT)
    else:  # BM == 1
        acc = _loop_fma(x_ptr + tl.program_id(2) * stride_xm, q_ptr, s_ptr, z_ptr, perm_ptr, k0, nt, g, q1row,
                        q2row, srow, kk0, offs_n, n_mask, N, ones, BN, P1, P2, HAS_ZEROS, HAS_PERM,
                        HAS_G32, PDL, H2 if P1 != 8 else 0, STAGES)  # 8 bits: the fp32 decode
    return acc


@triton.jit
def qmatmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, meta_ptr, out_ptr, buf_ptr, ibuf_ptr, cnt_ptr, M, N,
                   stride_xm, stride_om, ones, ss_in_ptr, eps, res_ptr, stride_rm, gamma_ptr, ss_out_ptr,
                   u_tiles, u_kt, u_g, u_bits,
                   BM: tl.constexpr, BN: tl.constexpr, WIDTHS: tl.constexpr, USE_DOT: tl.constexpr,
                   HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_G32: tl.constexpr, ATOMIC: tl.constexpr,
                   DOT_DT: tl.constexpr, PDL: tl.constexpr, H2: tl.constexpr, NORM_IN: tl.constexpr,
                   RESID: tl.constexpr, GLU: tl.constexpr, STAGES: tl.constexpr = 1, EVEN_N: tl.constexpr = False,
                   EPI_EARLY: tl.constexpr = False, UNIFORM: tl.constexpr = False):
    """out (M, N) = x (M, K) @ Wq^T; program_id(1) = split. WIDTHS: bit b set when width b occurs, so a
    matrix of one width compiles one loop, a mixed one a runtime branch per width present.
    PDL (pdl.py): 0 off; 1 wait at the start; 2: the one-row path waits after loading its first tile.
    NORM_IN / RESID / GLU: the fused epilogue (_finish). With GLU, W is [gate; up] (N = 2I rows) and column
    block b takes gate columns b*BN/2 .. and the same up columns I + b*BN/2 .., so silu(gate) * up of BN/2
    outputs is finished in one program; the host makes sure I is a multiple of BN/2.
    EVEN_N: every program's BN columns exist (no column masks: fewer predicated loads and zero fills).
    EPI_EARLY: the epilogue's operands are loaded before the split-K atomics (qmatmul_store.store_tile).
    UNIFORM: one segment of width u_bits covers K; the splits are u_tiles blocks of 64 each (u_kt in all), group
    size u_g, and the metadata table is not read (_split_fields)."""
    pdl.launch_dependents(PDL)
    if USE_DOT or PDL == 1:
        pdl.wait(PDL)
    if GLU:
        j = tl.arange(0, BN)
        half: tl.constexpr = BN // 2
        offs_n = tl.program_id(0) * half + j % half + (j // half) * (N // 2)
        # each half is BN/2 contiguous columns starting at a multiple of 16: vector loads stay possible
        offs_n = tl.max_contiguous(tl.multiple_of(offs_n, 16), 16)
    else:
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    if EVEN_N:  # a constant mask: the loads lose their predicates and the zero fills (CS2R) of masked lanes
        n_mask = tl.full((BN,), 1, tl.int1)
    else:
        n_mask = offs_n < N
    offs_m = tl.program_id(2) * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    meta = meta_ptr + tl.program_id(1) * 8
    uni = (u_tiles, u_kt, u_g)
    if UNIFORM:
        bits = u_bits
    else:
        bits = tl.load(meta + 2)
    acc = tl.zeros((BM, BN), tl.float32)
    if (WIDTHS >> 2) & 1:  # noqa: SIM102 (constexpr test, then a runtime one)
        if bits == 2:
            acc = _split(x_ptr, stride_xm, offs_m, m_mask, q_ptr, s_ptr, z_ptr, perm_ptr, meta, uni, offs_n, n_mask, N,
                         ones, BM, BN, 2, 0, USE_DOT, HAS_ZEROS, HAS_PERM, HAS_G32, DOT_DT, PDL, H2, STAGES, UNIFORM)
    if (WIDTHS >> 3) & 1:  # noqa: SIM102 (constexpr test, then a runtime one)
        if bits == 3:
            acc = _split(x_ptr, stride_xm, offs_m, m_mask, q_ptr, s_ptr, z_ptr, perm_ptr, meta, uni, offs_n, n_mask, N,
                         ones, BM, BN, 3, 0, USE_DOT, HAS_ZEROS, HAS_PERM, HAS_G32, DOT_DT, PDL, H2, STAGES, UNIFORM)
    if (WIDTHS >> 4) & 1:  # noqa: SIM102 (constexpr test, then a runtime one)
        if bits == 4:
            acc = _split(x_ptr, stride_xm, offs_m, m_mask, q_ptr, s_ptr, z_ptr, perm_ptr, meta, uni, offs_n, n_mask, N,
                         ones, BM, BN, 4, 0, USE_DOT, HAS_ZEROS, HAS_PERM, HAS_G32, DOT_DT, PDL, H2, STAGES, UNIFORM)
    if (WIDTHS >> 5) & 1:  # noqa: SIM102 (constexpr test, then a runtime one)
        if bits == 5:
            acc = _split(x_ptr, stride_xm, offs_m, m_mask, q_ptr, s_ptr, z_ptr, perm_ptr, meta, uni, offs_n, n_mask, N,
                         ones, BM, BN, 4, 1, USE_DOT, HAS_ZEROS, HAS_PERM, HAS_G32, DOT_DT, PDL, H2, STAGES, UNIFORM)
    if (WIDTHS >> 6) & 1:  # noqa: SIM102 (constexpr test, then a runtime one)
        if bits == 6:
            acc = _split(x_ptr, stride_xm, offs_m, m_mask, q_ptr, s_ptr, z_ptr, perm_ptr, meta, uni, offs_n, n_mask, N,
                         ones, BM, BN, 4, 2, USE_DOT, HAS_ZEROS, HAS_PERM, HAS_G32, DOT_DT, PDL, H2, STAGES, UNIFORM)
    if (WIDTHS >> 8) & 1:  # noqa: SIM102 (constexpr test, then a runtime one)
        if bits == 8:
            acc = _split(x_ptr, stride_xm, offs_m, m_mask, q_ptr, s_ptr, z_ptr, perm_ptr, meta, uni, offs_n, n_mask, N,
                         ones, BM, BN, 8, 0, USE_DOT, HAS_ZEROS, HAS_PERM, HAS_G32, DOT_DT, PDL, H2, STAGES, UNIFORM)
    pdl.wait(PDL)  # a no-op after the first: covers every path before the first global write
    store_tile(acc, out_ptr, stride_om, buf_ptr, ibuf_ptr, cnt_ptr, offs_m, m_mask, offs_n, n_mask, N,
               ss_in_ptr, eps, res_ptr, stride_rm, gamma_ptr, ss_out_ptr, BM, BN, ATOMIC, NORM_IN, RESID, GLU,
               EPI_EARLY)


@triton.jit
def dequant_kernel(q_ptr, s_ptr, z_ptr, meta_ptr, w_ptr, rows_ptr, N, NB, TOTAL, BN: tl.constexpr, P1: tl.constexpr,
                   P2: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_ROWS: tl.constexpr, PDL: tl.constexpr):
    """w (K, N) in permuted input order = (q - z) * s for the splits of one width (P1 + P2 bits); HAS_ROWS:
    permuted input k goes to row rows[k] (the matrix's permutation: w comes out in the input order, so the
    many rows of x need no gather).
    Used for many rows, followed by cuBLAS. w may reuse memory an earlier kernel still reads: wait first.
    Work item i of TOTAL = splits x NB column blocks is (split i // NB, block i % NB); program p does items
    p, p + programs, ...: one each on a full grid, or a few persistent programs that leave the other SMs
    to a GEMM running beside it (the prefill's dequantize-ahead)."""
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    Z0: tl.constexpr = 1 << (P1 + P2 - 1)
    offs64 = tl.arange(0, 64)
    for i in range(tl.program_id(0), TOTAL, tl.num_programs(0)):
        pid_n, pid_s = i % NB, i // NB
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_mask = offs_n < N
        meta = meta_ptr + pid_s * 8
        k0, nt, g = tl.load(meta), tl.load(meta + 1), tl.load(meta + 3)
        q1row, q2row, srow, kk0 = tl.load(meta + 4), tl.load(meta + 5), tl.load(meta + 6), tl.load(meta + 7)
        for t in range(nt):
            f = _codes64(q_ptr, t, q1row, q2row, offs_n, n_mask, N, BN, P1, P2)  # (64, BN)
            ptr2 = (srow + (kk0 + t * 64 + offs64) // g)[:, None] * N + offs_n[None, :]  # scale row per input
            s = tl.load(s_ptr + ptr2, mask=n_mask[None, :], other=0.0).to(tl.float32)
            if HAS_ZEROS:
                c = tl.load(z_ptr + ptr2, mask=n_mask[None, :], other=0).to(tl.float32) + MAGIC
            else:
                c = MAGIC + Z0
            row = k0 + t * 64 + offs64
            if HAS_ROWS:
                row = tl.load(rows_ptr + row)
            dst = w_ptr + row[:, None] * N + offs_n[None, :]
            tl.store(dst, ((f - c) * s).to(w_ptr.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def _sylvester_signs(i, j):
    """(len(i), len(j)) int32 entries of the unscaled Sylvester Hadamard matrix at rows i, columns j:
    (-1)^popcount(i & j), the parity of the common bits folded into bit 0 (exact in any float type)."""
    v = i[:, None] & j[None, :]
    v ^= v >> 16
    v ^= v >> 8
    v ^= v >> 4
    v ^= v >> 2
    v ^= v >> 1
    return 1 - 2 * (v & 1)


@triton.jit
def hadamard_kernel(x_ptr, out_ptr, dst_ptr, stride_xm, stride_om, scale, H: tl.constexpr, BJ: tl.constexpr,
                    HAS_DST: tl.constexpr, PDL: tl.constexpr):
    """out[m, c] = scale * sum_i x[m, b*H + i] * (-1)^popcount(i & j) (the Sylvester matrix, scale 1/sqrt(H)) for
    the BJ outputs j of program_id(2), in fp32, where c = b*H + j, or with HAS_DST c = dst[b*H + j] (the inverse
    of the matrix's input permutation: the rotated row comes out in the permuted input order the quantized
    matmul reads). The signs are computed, not loaded, and dst is read before pdl.wait (it is never written),
    so after the wait a program only loads its H inputs.
    One launch replaces the torch path's cast + batched matmul + cast for the rotation of a few rows."""
    pdl.launch_dependents(PDL)
    m, b, jb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_i = tl.arange(0, H)
    offs_j = jb * BJ + tl.arange(0, BJ)
    cols = b * H + offs_j
    if HAS_DST:
        cols = tl.load(dst_ptr + cols)
    sign = _sylvester_signs(offs_i, offs_j).to(tl.float32)  # (H, BJ)
    pdl.wait(PDL)
    x = tl.load(x_ptr + m * stride_xm + b * H + offs_i).to(tl.float32)  # (H,)
    y = tl.sum(x[:, None] * sign, axis=0) * scale
    tl.store(out_ptr + m * stride_om + cols, y.to(out_ptr.dtype.element_ty))


@triton.jit
def rotate_rows_kernel(x_ptr, out_ptr, R, scale, H: tl.constexpr, BR: tl.constexpr, PDL: tl.constexpr):
    """x viewed as R blocks of H -> out = scale * x @ S (S: _sylvester_signs, scale 1/sqrt(H)): the block Hadamard
    rotation of many rows (a prompt's activations) as one tensor-core product per BR blocks, fp16/bf16 inputs
    (S is exact in them) with fp32 sums, rounded once like the fp32 reference (block_hadamard)."""
    pdl.launch_dependents(PDL)
    offs_h = tl.arange(0, H)
    sign = _sylvester_signs(offs_h, offs_h).to(x_ptr.dtype.element_ty)
    pdl.wait(PDL)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    offs = rows[:, None].to(tl.int64) * H + offs_h[None, :]
    mask = (rows < R)[:, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = tl.dot(x, sign, out_dtype=tl.float32) * scale
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gather_kernel(x_ptr, idx_ptr, out_ptr, K, stride_xm, stride_om, BK: tl.constexpr, PDL: tl.constexpr):
    """out[m, k] = x[m, idx[k]] for the BK inputs of program_id(1): a few rows of activations put in a matrix's
    permuted input order once, instead of every program of the matmul gathering them again."""
    pdl.launch_dependents(PDL)
    m = tl.program_id(0)
    offs = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = offs < K
    src = tl.load(idx_ptr + offs, mask=mask, other=0)  # never written: read before the wait
    pdl.wait(PDL)
    tl.store(out_ptr + m * stride_om + offs, tl.load(x_ptr + m * stride_xm + src, mask=mask), mask=mask)
