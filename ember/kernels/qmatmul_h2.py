"""Packed-half decode for the one-row quantized matmul (qmatmul_kernels.py, `_loop_fma`): two weights per
instruction instead of one.

The fp32 path spends a LOP3, an FADD and an FFMA per weight, which leaves the 2-, 3-, 5- and 6-bit and mixed
matrices issue-bound (docs/dev/qmatmul-notes.md). Here a plane word of width P yields pairs (slot j in the low
16-bit half, slot j + V/2 in the high half, same bit offset S), and per pair:
- LOP3 (word & mask) | 0x6400_6400: each half is the fp16 1024 + v * 2^S, exact while S + P <= 10 (slots
  higher up are taken from word >> 8, at S - 8);
- HFMA2 by 2^(E-S-4) minus (1024 + Z * 2^S) * 2^(E-S-4): (v - Z) * 2^(E-4) exactly (small integers times a
  power of two). Z centres the first plane at 2^(bits-1); E = 0 for the first plane, its width for the
  second (planes add as (P1 - Z) + 2^P1 * P2); the 1/16 keeps the fp16 sums far from overflow;
- HFMA2 with the matching pair of inputs (x[j*R + t], x[(j + V/2)*R + t]) into an f16x2 accumulator.
One word's products are summed in fp16 (4 per half at 4 bits, 8 at 2 bits, 16 at 1 bit), then converted to
fp32; everything after (scales, the zero-point correction, split-K) stays fp32. ExLlamaV2 accumulates 8
products per half the same way.

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
def _step(acc, src, MASK: tl.constexpr, F: tl.constexpr, C: tl.constexpr, xp, ASM: tl.constexpr):
    """acc += ((src & MASK | fp16 1024 magic) * F + C) * xp, on both fp16 halves of each int32."""
    if ASM:
        acc = tl.inline_asm_elementwise(
            "{ .reg .b32 p; lop3.b32 p, $1, $2, 0x64006400, 0xEA; fma.rn.f16x2 p, p, $3, $4; "
            "fma.rn.f16x2 $0, p, $5, $6; }",
            "=r,r,r,r,r,r,r", [src, MASK, _pair_const(F), _pair_const(C), xp, acc], dtype=tl.int32,
            is_pure=True, pack=1)
    else:
        p = (src & MASK) | 0x64006400
        lo = ((_from16(p) * F + C) * _from16(xp) + _from16(acc)).to(tl.float16)
        hi = ((_from16(p >> 16) * F + C) * _from16(xp >> 16) + _from16(acc >> 16)).to(tl.float16)
        acc = _bits16(lo) | (_bits16(hi) << 16)
    return acc


@triton.jit
def _halves(acc, ASM: tl.constexpr):
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
def plane_part_h2(w, x_ptr, perm_ptr, kb, BN: tl.constexpr, P: tl.constexpr, E: tl.constexpr, Z: tl.constexpr,
                  HAS_PERM: tl.constexpr, SUM_X: tl.constexpr, ASM: tl.constexpr):
    """One plane (words w (2P, BN)) of one block of 64 inputs at kb -> (lo, hi, sx_lo, sx_hi):
    lo / hi (2P, BN) fp32 = sum of (v - Z) * 2^(E-4) * x over each word's slots of inputs 0..31 / 32..63;
    sx_lo / sx_hi: the sums of those inputs (fp32 scalars, when SUM_X; for the zero-point correction).
    x is fp16."""
    V: tl.constexpr = 32 // P
    R: tl.constexpr = 2 * P
    H: tl.constexpr = V // 2
    M: tl.constexpr = (1 << P) - 1
    w8 = w >> 8  # slots whose 1024 + v * 2^S would not fit the fp16 mantissa are taken 8 bits lower
    acc = tl.zeros((R, BN), tl.int32)
    sx_lo = 0.0
    sx_hi = 0.0
    for j in tl.static_range(H):
        S = j * P
        ia = kb + j * R + tl.arange(0, R)
        ib = ia + H * R
        if HAS_PERM:
            ia = tl.load(perm_ptr + ia)
            ib = tl.load(perm_ptr + ib)
        xa = tl.load(x_ptr + ia)
        xb = tl.load(x_ptr + ib)
        if SUM_X:
            sx_lo += tl.sum(xa.to(tl.float32))
            sx_hi += tl.sum(xb.to(tl.float32))
        xp = (_bits16(xa) | (_bits16(xb) << 16))[:, None]
        if S + P <= 10:
            acc = _step(acc, w, (M << S) | (M << (S + 16)), 1.0 / (1 << (S + 4 - E)),
                        -(1024.0 + Z * (1 << S)) / (1 << (S + 4 - E)), xp, ASM)
        else:
            acc = _step(acc, w8, (M << (S - 8)) | (M << (S + 8)), 1.0 / (1 << (S - 4 - E)),
                        -(1024.0 + Z * (1 << (S - 8))) / (1 << (S - 4 - E)), xp, ASM)
    lo, hi = _halves(acc, ASM)
    return lo, hi, sx_lo, sx_hi
