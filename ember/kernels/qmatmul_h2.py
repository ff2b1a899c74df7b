"""Packed-half decode for the one-row quantized matmul (qmatmul_kernels.py, `_loop_fma`): two weights per
instruction instead of one.

The fp32 path spends a LOP3, an FADD and an FFMA per weight, which leaves the 2-, 3-, 5- and 6-bit and mixed
matrices issue-bound (docs/dev/qmatmul-notes.md). Here a plane word of width P yields pairs (slot j in the low
16-bit half, slot j + V/2 in the high half, same bit offset S), and per pair:
- LOP3 (word & mask) | 0x6400_6400: each half is the fp16 1024 + v * 2^S, exact while S + P <= 10 (slots
  higher up are taken from word >> 8, at S - 8);
- HFMA2 by 2^(-S-4) minus (1024 + Z * 2^S) * 2^(-S-4): (v - Z) / 16 exactly (small integers times a power
  of two). Z centres the code at 2^(bits-1); the 1/16 keeps the fp16 sums far from overflow. A second plane
  (5, 6 bits) is lined up with the first (`plane2_rows`) and shifted just above its bits, so a second
  LOP3 completes the code in the same pair: 4 instructions per two weights instead of 6 for two passes;
- HFMA2 with the matching pair of inputs (x[j*R + t], x[(j + V/2)*R + t]) into an f16x2 accumulator.
One word's products are summed in fp16 (4 per half at 4 bits, 8 at 2 bits, 16 at 1 bit), then converted to
fp32; everything after (scales, the zero-point correction, split-K) stays fp32. ExLlamaV2 accumulates 8
products per half the same way.

The 3-bit plane (docs/format.md: 6 word rows a block, five fields a half and spare bits) has its own
`plane_part3_h2`: three (2, BN) row groups stepped field by field, the x pair of each step one PRMT of two
int32 words of x (`_x_pairs`), then the spare-bit codes (`spare3`); its products stay in three f16x2
accumulators of 5-6 products per half.

ASM: PTX through tl.inline_asm_elementwise (GPU); off, the same arithmetic in plain Triton (the interpreter
cannot run PTX), so CPU tests check the pairing and the constants; the GPU tests check the PTX.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bits16(v):
    """fp16 tensor -> int32 holding its 16 bits in the low half."""
    return v.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _from16(b):
    """The low 16 bits of an int32 tensor read as fp16, returned as fp32."""
    return ((b << 16) >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pair_const(value: tl.constexpr):
    """(1, 1) int32: the fp16 `value` in both halves (folded to an immediate by the compiler)."""
    b = _bits16(tl.full((1, 1), value, tl.float16))
    return b | (b << 16)


@triton.jit
def _step(acc, src1, src2, M1: tl.constexpr, M2: tl.constexpr, F: tl.constexpr, C: tl.constexpr, xp, magic,
          TWO: tl.constexpr, ASM: tl.constexpr):
    """acc += ((src1 & M1 | src2 & M2 | fp16 1024 magic) * F + C) * xp on both fp16 halves of each int32; the
    second plane's bits (src2 & M2, only when TWO) sit just above the first's, so the pair is the whole code."""
    if ASM:
        if TWO:
            acc = tl.inline_asm_elementwise(
                "{ .reg .b32 p; lop3.b32 p, $1, $3, $9, 0xEA; lop3.b32 p, $2, $4, p, 0xEA; "
                "fma.rn.f16x2 p, p, $5, $6; fma.rn.f16x2 $0, p, $7, $8; }",
                "=r,r,r,r,r,r,r,r,r,r", [src1, src2, M1, M2, _pair_const(F), _pair_const(C), xp, acc, magic],
                dtype=tl.int32, is_pure=True, pack=1)
        else:
            acc = tl.inline_asm_elementwise(
                "{ .reg .b32 p; lop3.b32 p, $1, $2, $7, 0xEA; fma.rn.f16x2 p, p, $3, $4; "
                "fma.rn.f16x2 $0, p, $5, $6; }",
                "=r,r,r,r,r,r,r,r", [src1, M1, _pair_const(F), _pair_const(C), xp, acc, magic], dtype=tl.int32,
                is_pure=True, pack=1)
    else:
        p = (src1 & M1) | magic
        if TWO:
            p = p | (src2 & M2)
        lo = ((_from16(p) * F + C) * _from16(xp) + _from16(acc)).to(tl.float16)
        hi = ((_from16(p >> 16) * F + C) * _from16(xp >> 16) + _from16(acc >> 16)).to(tl.float16)
        acc = _bits16(lo) | (_bits16(hi) << 16)
    return acc


@triton.jit
def plane2_rows(q_ptr, row, offs_n, n_mask, N, P1: tl.constexpr, P2: tl.constexpr):
    """Second-plane words lined up with the first plane's 2*P1 word rows: input j*2P1 + t of the first plane
    sits in second-plane word t % 2P2 at slot j*(P1/P2) + t // 2P2, and its partner (slot j + 16/P1) at
    that slot + 16/P2, the same bit of the high half. Row t is that word shifted right (logically) by
    (t // 2P2) * P2, so both planes have the pair at the same bit offset j*P1 for every row: (2P1, BN) int32."""
    t = tl.arange(0, 2 * P1)
    w = tl.load(q_ptr + (row + t % (2 * P2))[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
    return (w.to(tl.uint32, bitcast=True) >> ((t // (2 * P2)) * P2)[:, None]).to(tl.int32, bitcast=True)


@triton.jit
def halves(acc, ASM: tl.constexpr):
    """f16x2 accumulator -> its (low, high) halves as fp32."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.f32.f16 $0, l; cvt.f32.f16 $1, h; }",
            "=f,=f,r", [acc], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        lo = _from16(acc)
        hi = _from16(acc >> 16)
    return lo, hi


@triton.jit
def plane_part_h2(w, w2, x_ptr, perm_ptr, kb, ones, BN: tl.constexpr, P: tl.constexpr, P2: tl.constexpr,
                  Z: tl.constexpr, HAS_PERM: tl.constexpr, SUM_X: tl.constexpr, ASM: tl.constexpr):
    """One block of 64 inputs at kb: first-plane words w (2P, BN) and, when P2 > 0, the second plane lined
    up by plane2_rows (w2, (2P, BN)) -> (lo, hi, sx_lo, sx_hi):
    lo / hi (2P, BN) fp32 = sum of (v - Z) / 16 * x over each word's slots of inputs 0..31 / 32..63, v the
    whole code (first plane + 2^P * second plane); sx_lo / sx_hi: the sums of those inputs (fp32 scalars,
    when SUM_X; for the zero-point correction). x is fp16; ones is the runtime -1 (the fp16 magic built from
    it stays in a register: with the mask also an immediate, ptxas would re-materialize one per LOP3)."""
    w8 = w >> 8  # slots higher up are taken 8 bits lower (only bits 0..7 of each half are read from w8)
    w2d = w  # (unused for one plane)
    w28 = w
    if P2 > 0:  # second-plane bits moved just above the first plane's: the pair then holds whole codes
        w2u = w2.to(tl.uint32, bitcast=True)
        w2d = (w2u << P).to(tl.int32, bitcast=True)
        w28 = ((w2u >> 8) << P).to(tl.int32, bitcast=True)
    magic = ones & 0x64006400
    acc = tl.zeros((2 * P, BN), tl.int32)
    sx_lo = 0.0
    sx_hi = 0.0
    for j in tl.static_range(16 // P):
        acc, sx_lo, sx_hi = _slot(acc, w, w8, w2d, w28, x_ptr, x_ptr, perm_ptr, kb, j, 0, magic, sx_lo, sx_hi, P,
                                  P2, Z, 2 * P, HAS_PERM, SUM_X, False, ASM)
    lo, hi = halves(acc, ASM)
    return lo, hi, sx_lo, sx_hi


@triton.jit
def _x_pairs(xw, E0: tl.constexpr, ROWS: tl.constexpr, ASM: tl.constexpr):
    """(ROWS,) int32: the fp16 pairs (x[E0 + t], x[E0 + 32 + t]) of a block whose x is read as int32 words at
    xw (each word two neighbouring inputs; E0 even): one PRMT per pair picks the low or the high halves of
    two words (the fp16 loads and their LOP3 + LEA packing took twice the instructions)."""
    x32 = xw + (E0 // 2 + tl.arange(0, ROWS // 2))
    a = tl.load(x32)  # (ROWS/2,) words of inputs e0 + 2k, e0 + 2k + 1
    b = tl.load(x32 + 16)  # the same 32 inputs further on
    if ASM:
        even = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
        odd = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [a, b], dtype=tl.int32,
                                        is_pure=True, pack=1)
    else:
        even = (a & 0xFFFF) | (b << 16)
        odd = ((a >> 16) & 0xFFFF) | (b & -65536)
    return tl.interleave(even, odd)


@triton.jit
def _slot(acc, w, w8, w2d, w28, x_ptr, xw, perm_ptr, kb, J: tl.constexpr, ROW0: tl.constexpr, magic, sx_lo, sx_hi,
          P: tl.constexpr, P2: tl.constexpr, Z: tl.constexpr, ROWS: tl.constexpr, HAS_PERM: tl.constexpr,
          SUM_X: tl.constexpr, XPRMT: tl.constexpr, ASM: tl.constexpr):
    """acc (ROWS, BN) f16x2 += the products of field J of both halves of word rows ROW0 .. ROW0 + ROWS of a
    block of 64 at kb: field J (bit J*P) of row t is input J*2P + t, + 32 in the high half (docs/format.md).
    w8 = w >> 8 serves the fields above bit 10 - P; w2d / w28: the second plane (P2 > 0) moved just above the
    first plane's bits, from w2 and w2 >> 8. x pairs: fp16 loads, or with XPRMT (and no permutation or sum of
    x) int32 words of x from xw = x_ptr + kb, one PRMT a pair (`_x_pairs`)."""
    R: tl.constexpr = 2 * P
    M: tl.constexpr = (1 << P) - 1
    M2: tl.constexpr = (1 << P2) - 1
    B: tl.constexpr = P + P2  # code bits: 1024 + code * 2^S is exact while S + B <= 10
    S: tl.constexpr = J * P
    E0: tl.constexpr = J * R + ROW0  # inputs kb + E0 + t (low halves) and kb + E0 + 32 + t (high halves)
    if XPRMT and not (HAS_PERM or SUM_X):
        xp = _x_pairs(xw, E0, ROWS, ASM)[:, None]
    else:
        if HAS_PERM:
            ia = kb + E0 + tl.arange(0, ROWS)
            xa = tl.load(x_ptr + tl.load(perm_ptr + ia))
            xb = tl.load(x_ptr + tl.load(perm_ptr + ia + 32))
        else:
            xrow = x_ptr + kb + ROW0 + tl.arange(0, ROWS)  # one 64-bit address; the fields add constant offsets
            xa = tl.load(xrow + J * R)
            xb = tl.load(xrow + J * R + 32)
        if SUM_X:
            sx_lo += tl.sum(xa.to(tl.float32))
            sx_hi += tl.sum(xb.to(tl.float32))
        xp = (_bits16(xa) | (_bits16(xb) << 16))[:, None]
    if S + B <= 10:
        acc = _step(acc, w, w2d, (M << S) | (M << (S + 16)), (M2 << (S + P)) | (M2 << (S + P + 16)),
                    1.0 / (1 << (S + 4)), -(1024.0 + Z * (1 << S)) / (1 << (S + 4)), xp, magic, P2 > 0, ASM)
    else:
        acc = _step(acc, w8, w28, (M << (S - 8)) | (M << (S + 8)), (M2 << (S - 8 + P)) | (M2 << (S + 8 + P)),
                    1.0 / (1 << (S - 4)), -(1024.0 + Z * (1 << (S - 8))) / (1 << (S - 4)), xp, magic, P2 > 0, ASM)
    return acc, sx_lo, sx_hi


@triton.jit
def spare3(w0, w1, w2):
    """The 3-bit plane's codes kept in spare bits (docs/format.md): rows 2u + t (u < 3) given as w0, w1, w2
    (t = the tensor row) -> int32 with the code of input 30 + t in bits 0..2 and that of input 62 + t in
    bits 16..18 (bit u from bit 15 / 31 of w_u)."""
    b0 = (w0.to(tl.uint32, bitcast=True) >> 15) & 0x10001
    b1 = (w1.to(tl.uint32, bitcast=True) >> 14) & 0x20002
    b2 = (w2.to(tl.uint32, bitcast=True) >> 13) & 0x40004
    return (b0 | b1 | b2).to(tl.int32, bitcast=True)


@triton.jit
def _to_f32(acc, G32: tl.constexpr, ASM: tl.constexpr):
    """f16x2 accumulator -> (lo, hi) fp32 halves with G32, else (lo + hi, unused)."""
    if G32:
        return halves(acc, ASM)
    s = halves_sum(acc, ASM)
    return s, s


@triton.jit
def plane_part3_h2(w, wb, w2, x_ptr, perm_ptr, kb, ones, BN: tl.constexpr, Z: tl.constexpr, HAS_PERM: tl.constexpr,
                   SUM_X: tl.constexpr, G32: tl.constexpr, ASM: tl.constexpr):
    """plane_part_h2 for the 3-bit plane, rows 0-1, 2-3, 4-5 of a block in w, wb, w2 -> (lo, hi, sx_lo, sx_hi):
    lo / hi fp32 (2, BN) sums of (v - Z) / 16 * x over inputs 0..31 / 32..63; without G32 lo holds both
    (added in fp16 first: one conversion) and hi is unused. Every field step covers all three row groups,
    so the tile's word loads are all needed at once (stepping one group after another let ptxas spread
    them over the loop: 8B decode 415-427 against 432-458 tok/s at 4 bits, call H2)."""
    magic = ones & 0x64006400
    sx_lo = 0.0
    sx_hi = 0.0
    xw = x_ptr.to(tl.pointer_type(tl.int32)) + kb // 2  # (kb: a multiple of 64)
    acc0 = tl.zeros((2, BN), tl.int32)
    acc1 = tl.zeros((2, BN), tl.int32)
    acc2 = tl.zeros((2, BN), tl.int32)
    w8, wb8, w28 = w >> 8, wb >> 8, w2 >> 8
    for j in tl.static_range(5):
        acc0, sx_lo, sx_hi = _slot(acc0, w, w8, w, w, x_ptr, xw, perm_ptr, kb, j, 0, magic, sx_lo, sx_hi,
                                   3, 0, Z, 2, HAS_PERM, SUM_X, True, ASM)
        acc1, sx_lo, sx_hi = _slot(acc1, wb, wb8, wb, wb, x_ptr, xw, perm_ptr, kb, j, 2, magic, sx_lo, sx_hi,
                                   3, 0, Z, 2, HAS_PERM, SUM_X, True, ASM)
        acc2, sx_lo, sx_hi = _slot(acc2, w2, w28, w2, w2, x_ptr, xw, perm_ptr, kb, j, 4, magic, sx_lo, sx_hi,
                                   3, 0, Z, 2, HAS_PERM, SUM_X, True, ASM)
    sp = spare3(w, wb, w2)  # one more field per half: inputs 30 + t and 62 + t
    acc0, sx_lo, sx_hi = _slot(acc0, sp, sp, sp, sp, x_ptr, xw, perm_ptr, kb, 0, 30, magic, sx_lo, sx_hi,
                               3, 0, Z, 2, HAS_PERM, SUM_X, True, ASM)
    lo, hi = _to_f32(acc0, G32, ASM)
    lo1, hi1 = _to_f32(acc1, G32, ASM)
    lo2, hi2 = _to_f32(acc2, G32, ASM)
    return lo + lo1 + lo2, hi + hi1 + hi2, sx_lo, sx_hi


@triton.jit
def halves_sum(acc, ASM: tl.constexpr):
    """f16x2 accumulator -> low + high half, added in fp16 and returned as fp32 (one scale for both)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $1; add.rn.f16 l, l, h; cvt.f32.f16 $0, l; }",
            "=f,r", [acc], dtype=tl.float32, is_pure=True, pack=1)
    return (_from16(acc) + _from16(acc >> 16)).to(tl.float16).to(tl.float32)
