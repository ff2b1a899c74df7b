"""Fused dequantize-GEMM for many rows of x (prompts): y = x @ W^T with 4-bit W decoded in registers, no 16-bit
copy of W in memory.

Dequantize + cuBLAS (qmatmul.py's path above 64 rows) writes every weight as 16 bits before the GEMM reads
it back: at 512 rows of the 8B shapes that is 0.22 of 0.53 ms a layer (docs/dev/qmatmul-notes.md, eighth
session). Here each program computes a (BN outputs, BM rows) tile of y^T = W (BN x K) @ x^T (K x BM):
- W is the wgmma's A operand, which may come from registers: a program decodes its (BN, 64) block of W
  straight into the A fragment. x^T is the B operand, loaded to shared memory by the pipeliner (cp.async).
- Decode: word r of a 4-bit block holds inputs 8j + r at bits 4j (docs/format.md). One PRMT puts bytes of
  the words r = 2p and 2p + 1 side by side, so one LOP3 with 0x000F000F | 0x6400_6400 gives the pair of
  inputs (8j + 2p, 8j + 2p + 1) as two 16-bit floats 1024 + code; a packed subtract of 1024 + z and a
  packed multiply by the scale give (code - z) * s, rounded once, as the dequantize kernel rounds it. That
  is 7 instructions per 4 weights (`_pairs4`).
- The pair (8j + 2p, 8j + 2p + 1) in one register is what the A fragment wants: thread p of each quad
  holds k = 2p, 2p + 1 and 2p + 8, 2p + 9 of every 16 inputs, i.e. words 2p and 2p + 1. The joins and
  permutes below only name that order for Triton; they compile to no data movement (offline SASS: no
  shared-memory store in the loop).
ASM = False computes the same pairs in plain Triton (the interpreter cannot run PTX), bit for bit, and
multiplies in fp32 (the interpreter's tl.dot mishandles bf16).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _pairs_ref(we, wo, sp, zp, J: tl.constexpr, BF16: tl.constexpr):
    """Plain-Triton pair J of `_pairs4`, unpacked: (BN, 4, 2) 16-bit (code - z) * s of inputs (8J + 2p,
    8J + 2p + 1). sp / zp as in _pairs4 (only the low half is read)."""
    dt: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    base: tl.constexpr = 128.0 if BF16 else 1024.0
    s = _from_bits(sp, dt)
    z = _from_bits(zp, dt) - base
    lo = ((((we >> (4 * J)) & 15).to(tl.float32) - z) * s).to(dt)
    hi = ((((wo >> (4 * J)) & 15).to(tl.float32) - z) * s).to(dt)
    return tl.join(lo, hi)


@triton.jit
def _from_bits(b, dt: tl.constexpr):
    """The 16-bit value in the low half of int32 b, as fp32 (bf16: its bits are an fp32's top half)."""
    if dt == tl.bfloat16:
        return (b << 16).to(tl.float32, bitcast=True)
    return (b & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


def _pairs_asm(op: str, magic: str) -> str:
    """PTX of `_pairs4` for one 16-bit type: $8 / $9 the words, $10 the scale pair, $11 the zero pair, $0..$7 the
    pairs j = 0..7 (PRMT 0x5410 puts bytes 0-1 of both words side by side: slots 0-3; 0x7632: slots 4-7)."""
    lines = ["{ .reg .b32 b, v, c;", f"mov.b32 c, {magic};"]
    for half, sel in ((0, "0x5410"), (1, "0x7632")):
        lines.append(f"prmt.b32 b, $8, $9, {sel};")
        for j in range(4):
            src = "b" if j == 0 else "v"
            if j:
                lines.append(f"shr.b32 v, b, {4 * j};")
            lines.append(f"lop3.b32 v, {src}, 0x000F000F, c, 0xEA; sub.{op} v, v, $11; mul.{op} ${4 * half + j}, v, $10;")
    return " ".join(lines) + " }"


_PAIRS_F16 = tl.constexpr(_pairs_asm("f16x2", "0x64006400"))  # 1024 + code in each half
_PAIRS_BF16 = tl.constexpr(_pairs_asm("bf16x2", "0x43004300"))  # 128 + code


@triton.jit
def _pairs4(we, wo, sp, zp, ASM: tl.constexpr, BF16: tl.constexpr):
    """Words r = 2p (we) and 2p + 1 (wo) of a 4-bit block, int32 (BN, 4) -> 8 int32 (BN, 4): pair j holds
    inputs (8j + 2p, 8j + 2p + 1) in its (low, high) halves, each (code - z) * s in 16 bits. sp: the scale in
    both halves; zp: 1024 + z (fp16) or 128 + z (bf16) in both halves. Without ASM the pairs come unpacked,
    (BN, 4, 2)."""
    if ASM:
        outs = tl.inline_asm_elementwise(_PAIRS_BF16 if BF16 else _PAIRS_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r",
                                         [we, wo, sp, zp], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        outs = (_pairs_ref(we, wo, sp, zp, 0, BF16), _pairs_ref(we, wo, sp, zp, 1, BF16),
                _pairs_ref(we, wo, sp, zp, 2, BF16), _pairs_ref(we, wo, sp, zp, 3, BF16),
                _pairs_ref(we, wo, sp, zp, 4, BF16), _pairs_ref(we, wo, sp, zp, 5, BF16),
                _pairs_ref(we, wo, sp, zp, 6, BF16), _pairs_ref(we, wo, sp, zp, 7, BF16))
    return outs


@triton.jit
def _halves(p, DT: tl.constexpr):
    """int32 tensor of 16-bit pairs -> DT tensor with a trailing dim of 2, [.., 0] = low half."""
    lo = (p & 0xFFFF).to(tl.int16).to(DT, bitcast=True)
    hi = (p >> 16).to(tl.int16).to(DT, bitcast=True)
    return tl.join(lo, hi)


@triton.jit
def _pair_bits(v, DT: tl.constexpr):
    """Values exact in DT -> int32 of the same shape holding the DT value in both halves."""
    if DT == tl.bfloat16:  # bf16 is the top half of the fp32 (the value is exact in bf16 already)
        b = (v.to(DT).to(tl.float32).to(tl.int32, bitcast=True) >> 16) & 0xFFFF
    else:
        b = v.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


@triton.jit
def _ld(ptr, mask, EVEN: tl.constexpr):
    """tl.load with a mask (zeros where it is off), or none when EVEN (whole tiles)."""
    if EVEN:
        v = tl.load(ptr)
    else:
        v = tl.load(ptr, mask=mask, other=0)
    return v


@triton.jit
def _tile(v, BN: tl.constexpr, NW: tl.constexpr):
    """Flat (BN * 4,) loaded in qgemm4_kernel's order -> (BN, 4) [column, p]: i = lane + 32 (warp + NW reg)
    with lane = 4 c + p and column = c + 8 (reg % 2) + 16 warp + 16 NW (reg // 2)."""
    R: tl.constexpr = BN * 4 // (32 * NW)
    t = tl.reshape(v, (R // 2, 2, NW, 8, 4))  # [reg // 2, reg % 2, warp, c, p]
    return tl.reshape(tl.permute(t, (0, 2, 1, 3, 4)), (BN, 4))


@triton.jit
def _zero_pairs(ptr, mask, EVEN: tl.constexpr, BN: tl.constexpr, NW: tl.constexpr, BASE: tl.constexpr,
                DT: tl.constexpr):
    """(BN, 4) int32: BASE + the zero point (uint8 at ptr, loaded flat as the words) in both 16-bit halves."""
    z = _tile(_ld(ptr, mask, EVEN), BN, NW).to(tl.float32)
    return _pair_bits(z + BASE, DT)


@triton.jit
def _wblock(q_ptr, s_ptr, z_ptr, t, N, wofs, sofs, wmask, zsym, BN: tl.constexpr, NW: tl.constexpr,
            TPG: tl.constexpr, HAS_ZEROS: tl.constexpr, EVEN_N: tl.constexpr, ASM: tl.constexpr, DT: tl.constexpr):
    """Block t (inputs 64t .. 64t + 63) of the program's BN columns -> (BN, 64) DT (code - z) * s, each
    thread holding the A fragment's elements (qgemm4_kernel's load order); zsym: the symmetric zero's pairs."""
    BF16: tl.constexpr = DT == tl.bfloat16
    BASE: tl.constexpr = 128 if BF16 else 1024
    wrow = q_ptr + t * 8 * N + wofs
    we = _tile(_ld(wrow, wmask, EVEN_N), BN, NW)  # (BN, 4) words 2p
    wo = _tile(_ld(wrow + N, wmask, EVEN_N), BN, NW)  # words 2p + 1
    # scales (and zeros) loaded in the words' (BN, 4) layout: each thread reads its own rows' values, so
    # nothing is moved between threads (a (BN,) load cost shared-memory stores and a barrier a tile)
    sz = (2 * t if TPG == 0 else t // TPG) * N + sofs
    sp = _pair_bits(_tile(_ld(s_ptr + sz, wmask, EVEN_N), BN, NW), DT)
    zp = _zero_pairs(z_ptr + sz, wmask, EVEN_N, BN, NW, BASE, DT) if HAS_ZEROS else zsym
    p0, p1, p2, p3, p4, p5, p6, p7 = _pairs4(we, wo, sp, zp, ASM, BF16)
    if TPG == 0:  # groups of 32: inputs 32..63 have their own scale row
        sp = _pair_bits(_tile(_ld(s_ptr + sz + N, wmask, EVEN_N), BN, NW), DT)
        zp = _zero_pairs(z_ptr + sz + N, wmask, EVEN_N, BN, NW, BASE, DT) if HAS_ZEROS else zsym
        _, _, _, _, p4, p5, p6, p7 = _pairs4(we, wo, sp, zp, ASM, BF16)
    # the eight pairs stacked by j = j0 + 2 j1 + 4 j2 (trailing dims j2, j1, j0), then put in input order 8j + 2p + e
    pp = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    if ASM:  # int32 pairs: [n, p, j2, j1, j0] -> (BN, 32) [n, 4j + p], split into halves once
        w = tl.reshape(_halves(tl.reshape(tl.permute(pp, (0, 2, 3, 4, 1)), (BN, 32)), DT), (BN, 64))
    else:  # unpacked pairs: [n, p, e, j2, j1, j0] -> [n, j2, j1, j0, p, e]
        w = tl.reshape(tl.permute(pp, (0, 3, 4, 5, 1, 2)), (BN, 64))
    return w


@triton.jit
def _store_y(acc, out_ptr, offs_m, m_mask, pid_n, N, stride_om, BN: tl.constexpr, BM: tl.constexpr,
             EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, GLU: tl.constexpr, DT: tl.constexpr):
    """Store a tile's fp32 sums acc (BN, BM) = y^T, rounded to DT; GLU: rows [gate | up] -> silu(gate) * up of
    the rounded values (as the separate SiLU-and-multiply computes it), BN/2 outputs."""
    if GLU:
        y = acc.to(DT).to(tl.float32)
        gate, up = tl.split(tl.permute(tl.reshape(y, (2, BN // 2, BM)), (1, 2, 0)))  # (BN/2, BM) each
        cols = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        act = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + offs_m[None, :] * stride_om + cols[:, None], act.to(DT),
                 mask=None if EVEN_M and EVEN_N else m_mask[None, :] & (cols < N // 2)[:, None])
    else:
        offs_n = pid_n * BN + tl.arange(0, BN)
        tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None], acc.to(DT),
                 mask=None if EVEN_M and EVEN_N else m_mask[None, :] & (offs_n < N)[:, None])


@triton.jit
def qgemm4_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_om, n_whole,
                  BN: tl.constexpr, BM: tl.constexpr, HAS_ZEROS: tl.constexpr, TPG: tl.constexpr,
                  EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, ASM: tl.constexpr, NW: tl.constexpr,
                  KB: tl.constexpr, SPLIT: tl.constexpr, GLU: tl.constexpr):
    """out (M, N) = x (M, K) @ W^T for a 4-bit matrix of one segment (word rows 8t .. 8t + 7 for inputs 64t ..
    64t + 63, scale row t // TPG for groups of 64 TPG inputs; TPG = 0: groups of 32, rows 2t and 2t + 1; a
    constexpr, so no division in the loop). KB: blocks of 64 a step (2 when K % 128 == 0). EVEN_M / EVEN_N:
    no partial tiles, no masks. Tile (pid_m, pid_n): rows BM pid_m .., outputs BN pid_n ..; pid_m varies
    fastest, so the programs sharing a block of W run together and it is read from memory about once.
    NW = num_warps; BN a multiple of 16 NW (16 rows a warp, an even number of registers).
    A 1-D grid: programs 0 .. n_whole - 1 each compute tile pid whole; each later tile is split along K into
    SPLIT equal runs (K a multiple of 64 KB SPLIT), SPLIT consecutive programs. A split program stores its
    fp32 partial to ws (tile - n_whole, s, BN, BM); the last program of a tile (cnt_ptr, one int32 a split
    tile, zero between launches) adds the partials in order s = 0, 1, .. (the same result whichever finishes
    last) and stores y. What it is for: narrow matrices at prompt sizes (o, down: N = 4096 makes 64 tiles of
    128 x 256 at 512 rows, on 132 SMs), and the last, partial wave of a wide one (split_plan).
    GLU: W is [gate | up] (N = 2I) and out (M, I) = silu(gate) * up of the rounded product: a tile's first BN/2
    rows are gate rows, the others the up rows of the same outputs (only the addresses change; the
    SiLU-and-multiply of the prompt's MLP, a separate pass over (M, 2I) otherwise, is done in registers)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    BASE: tl.constexpr = 128 if DT == tl.bfloat16 else 1024
    pid = tl.program_id(0)
    n_split = 1
    pid_s = 0
    tile = pid
    if SPLIT > 1:
        if pid >= n_whole:
            n_split = SPLIT
            pid_s = (pid - n_whole) % SPLIT
            tile = n_whole + (pid - n_whole) // SPLIT
    num_m = tl.cdiv(M, BM)
    pid_m = tile % num_m
    pid_n = tile // num_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    # The (BN, 4) word tiles are loaded as one flat run i < BN * 4, which gets the default 1-D layout (lane
    # i % 32, warp (i // 32) % NW, register i // (32 NW)), and element i is given the column and pair row
    # that the wgmma A fragment wants in that thread: p = lane % 4, column lane // 4 + 8 (reg % 2) +
    # 16 warp + 16 NW (reg // 2). `_tile` then names that order (a reshape and a permute, no data movement).
    # Loaded as (BN, 4), the words got lanes along n (the contiguous direction in memory) and the decoded
    # tile went through shared memory with a barrier every step (offline SASS).
    i = tl.arange(0, BN * 4)
    lane = i % 32
    reg = i // (32 * NW)
    col = lane // 4 + 8 * (reg % 2) + 16 * ((i // 32) % NW) + 16 * NW * (reg // 2)
    if GLU:  # tile row c < BN/2: gate row pid_n BN/2 + c; c >= BN/2: the up row I + pid_n BN/2 + c - BN/2
        row = pid_n * (BN // 2) + col % (BN // 2) + (col // (BN // 2)) * (N // 2)
        wmask = pid_n * (BN // 2) + col % (BN // 2) < N // 2
    else:
        row = pid_n * BN + col
        wmask = row < N
    wofs = (2 * (lane % 4)) * N + row  # word 2p of that row, from the block's first word row
    xmask = m_mask[:, None]
    acc = tl.zeros((BN, BM), tl.float32)
    # The loop runs at least once. Without this the compiler keeps a zero-trip path that re-zeroes the
    # accumulator, and ptxas then serializes every wgmma (C7515: each one waits for the last to finish,
    # offline SASS), so the decode could not overlap the tensor cores.
    tl.assume(K >= 64 * KB * SPLIT)
    zsym = _pair_bits(tl.full((BN, 4), BASE + 8, tl.float32), DT)  # symmetric: the zero is 8
    steps = K // (64 * KB)
    if SPLIT > 1:  # a split program starts at block b0 of 64: the pointers move, so the loop is the unsplit one
        steps = steps // n_split
        tl.assume(steps >= 1)
        b0 = pid_s * steps * KB  # a multiple of TPG (qgemm checks)
        q_ptr += b0 * 8 * N
        x_ptr += b0 * 64
        s_ptr += (2 * b0 if TPG == 0 else b0 // TPG) * N
        z_ptr += (2 * b0 if TPG == 0 else b0 // TPG) * N
    for t in range(steps):
        w = _wblock(q_ptr, s_ptr, z_ptr, t * KB, N, wofs, row, wmask, zsym, BN, NW, TPG, HAS_ZEROS, EVEN_N, ASM, DT)
        if KB == 2:  # two blocks of 64 a step: the loop's fixed work (barrier, waits, addresses) is paid half as often
            w2 = _wblock(q_ptr, s_ptr, z_ptr, t * KB + 1, N, wofs, row, wmask, zsym, BN, NW, TPG, HAS_ZEROS,
                         EVEN_N, ASM, DT)
            w = tl.reshape(tl.permute(tl.join(w, w2), (0, 2, 1)), (BN, 128))
        x = _ld(x_ptr + offs_m[:, None] * stride_xm + (t * 64 * KB + tl.arange(0, 64 * KB))[None, :], xmask,
                EVEN_M)
        if ASM:
            acc = tl.dot(w, tl.trans(x), acc)
        else:  # the interpreter's tl.dot mishandles bf16 operands: fp32 holds both 16-bit types exactly
            acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc)
    if n_split == 1:
        _store_y(acc, out_ptr, offs_m, m_mask, pid_n, N, stride_om, BN, BM, EVEN_M, EVEN_N, GLU, DT)
    else:
        ti = tile - n_whole
        local = tl.arange(0, BN)[:, None] * BM + tl.arange(0, BM)[None, :]
        part = ws_ptr + ti.to(tl.int64) * (SPLIT * BN * BM)
        tl.store(part + pid_s * (BN * BM) + local, acc)
        tl.debug_barrier()  # every thread's partial is issued before the counter is released
        if tl.atomic_add(cnt_ptr + ti, 1, sem="acq_rel") == SPLIT - 1:  # the last split of this tile
            total = tl.load(part + local)
            for s in tl.static_range(1, SPLIT):
                total += tl.load(part + s * (BN * BM) + local)
            _store_y(total, out_ptr, offs_m, m_mask, pid_n, N, stride_om, BN, BM, EVEN_M, EVEN_N, GLU, DT)
            tl.atomic_xchg(cnt_ptr + ti, 0, sem="relaxed")  # zero again for the next launch


# Where the fused kernel beats dequantize + cuBLAS, and its tiles, by rows M and outputs N (H100, Llama-3-8B
# shapes, scripts/sweep_qgemm.py, docs/benchmarks.md thirteenth and fourteenth rounds, S2's sweep unless named;
# us, fused against dequantize + cuBLAS):
# - gate/up (N = 28672): 92.8 / 202.3 at 128 rows, 133.1 / 217.7 at 256, 232.4 / 286.1 at 512 (its 448 tiles
#   fill 3.4 waves of 132 SMs: the last 52 run split in two, split_plan), 441.6 / 437.6 at 1024;
# - qkv (N = 6144): 30.4 / 52.4 at 128 (split in 2), 42.4 / 56.3 at 256 (split in 2), lost from 384 on;
# - o (N = 4096, K = 4096): split in 4, 22.7 / 30.5 at 128, 30.7 / 35.8 at 256; lost from 384 on;
# - down (N = 4096, K = 14336): split in 4, 51.0 / 113.4 at 128, 75.9 / 116.1 at 256; split in 2, 122.5 / 138.5 at
#   512; 114.5 / 133.3 at 192 unsplit (R5); lost at 1024;
# at 2048 rows every shape loses (0.70 of cuBLAS's rate on 16-bit weights: no longer pays for the dequantize).


def use_for(M: int, N: int, K: int) -> bool:
    """Whether M rows of an N x K matrix go through the fused kernel (else dequantize + cuBLAS). Only whole tiles
    (M and N multiples of the picked tile) and two blocks a step (K % 128 == 0): the form the sweeps time. The
    masked form (partial tiles) passes the GPU tests (fourteenth round) but is not timed (the graph prefill pads
    prompts to multiples of 256 rows)."""
    if N >= 16384:
        rows = M <= 512
    elif N >= 6144:
        rows = M <= 256
    elif K < 8192:  # o: split in 4 wins at 128 and 256 rows; unsplit 64 x 64 tiles lose at 192 (R5: 35.8 / 32.2)
        rows = M <= 128 or 192 < M <= 256
    else:
        rows = M <= 512
    bn, bm = pick_config(M, N, K)[:2]
    return rows and M % bm == 0 and N % bn == 0 and K % 128 == 0


def pick_config(M: int, N: int, K: int) -> tuple[int, int, int, int, int]:
    """(BN, BM, warps, stages, split), the sweep's best at the rows measured nearest; split > 1: the tiles of
    a last partial wave (or all, when they fill less than one) are split along K (split_plan)."""
    if N >= 16384:
        return (128, 128, 8, 4, 1) if M <= 128 else (128, 256, 8, 3, 2)
    if N >= 6144:
        return (128, 128, 8, 4, 2) if M <= 128 else (128, 128, 8, 4, 1) if M <= 192 else (128, 256, 8, 3, 2)
    if M <= 128:
        return (128, 128, 8, 4, 4)
    if M <= 192:
        return (64, 64, 4, 4, 1)
    return (128, 256, 8, 3, 4) if M <= 256 else (128, 256, 8, 3, 2)


def env_config() -> tuple[int, ...] | None:
    """EMBER_QGEMM_CFG="BN,BM,warps,stages[,split]" (or the same joined by "x", for A/B arms that split on
    commas); A/B runs: it overrides pick_config after use_for has chosen the kernel, so a tile that does not
    divide M or N takes the masked form. None (the default) when unset."""
    v = os.environ.get("EMBER_QGEMM_CFG")
    return tuple(int(a) for a in v.replace("x", ",").split(",")) if v else None


def group_size(qt, segs: list[list[int]]) -> int:
    """The group size if the fused kernel can take this matrix, else 0: one 4-bit segment (rows of make_segments),
    no input permutation (act-order matrices keep dequantize + cuBLAS, which un-permutes the weight's rows
    instead of gathering x), N a multiple of 16. Host values only: called by make_plan, before any graph."""
    if len(segs) != 1 or segs[0][2] != 4 or qt.perm is not None or qt.out_features % 16:
        return 0
    return segs[0][3]


# Split-K tile counters per device, zero between launches (the last program of a tile re-zeroes its own).
# Made by counters() from make_plan, before any graph capture; a launch with more tiles than this runs unsplit.
_COUNTERS: dict[str, torch.Tensor] = {}
N_COUNTERS = 1 << 14


def counters(device: torch.device) -> torch.Tensor:
    c = _COUNTERS.get(str(device))
    if c is None:
        c = _COUNTERS[str(device)] = torch.zeros(N_COUNTERS, dtype=torch.int32, device=device)
    return c


def split_plan(tiles: int, split: int, slots: int) -> int:
    """How many tiles run whole (the first ones) when the others may each be split into `split` programs of
    1/split the work, on `slots` programs at once: the fewest split tiles that give the shortest run, counted
    in waves of whole-tile time (programs start in order, each on the first free slot). 64 tiles on 132
    slots: all split (1 -> 1/2); 448 tiles: 3 whole waves, then the last 52 tiles split (4 -> 3.5 waves);
    96 tiles, split 2: none (192 halves take as long as 96 wholes)."""
    best, best_w = tiles, float(triton.cdiv(tiles, slots))
    for waves in range(tiles // slots, -1, -1):  # whole tiles in full waves, the rest split
        n_whole = waves * slots
        t = waves + triton.cdiv((tiles - n_whole) * split, slots) / split
        if t < best_w - 1e-9:
            best, best_w = n_whole, t
    return best


def _slots(device, bm: int, bn: int) -> int:
    """Programs that run at once: one a streaming multiprocessor for tiles of 128 x 128 and up (registers and
    shared memory take the whole SM, offline compile), two for smaller ones; 132 under the interpreter (H100)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return sms * (1 if bm * bn >= 128 * 128 else 2)


def takes(x2) -> bool:
    """Whether these activations can go through the kernel: fp16 on sm_80+ or bf16 on sm_90+ (the packed
    bf16 arithmetic), or the interpreter."""
    if x2.dtype not in (torch.float16, torch.bfloat16):
        return False
    if x2.is_cuda:
        return torch.cuda.get_device_capability(x2.device) >= ((9, 0) if x2.dtype == torch.bfloat16 else (8, 0))
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kb(K: int) -> int:
    """Blocks of 64 inputs a loop step: 2 where K allows (EMBER_QGEMM_KB=1: one, for A/B runs)."""
    return 2 if K % 128 == 0 and os.environ.get("EMBER_QGEMM_KB", "2") != "1" else 1


def qgemm(x2, qt, out2, g: int, config: tuple[int, ...] | None = None, asm: bool | None = None,
          glu: bool = False):
    """out2 (M, N) = x2 (M, K) @ dequantize(qt)^T for a matrix of group size g = group_size(...) > 0; x2
    contiguous rows. config: (BN, BM, warps, stages[, split]), default pick_config. glu: qt is [gate | up]
    (N = 2I, I a multiple of BN/2 unless the tile is masked) and out2 (M, I) = silu(gate) * up."""
    M, K = x2.shape
    N = qt.out_features
    bn, bm, warps, stages, split = (*(config or pick_config(M, N, K)), 1)[:5]
    if bn % (16 * warps):
        raise ValueError(f"qgemm tile {config}: BN must be a multiple of 16 x warps with 2+ rows a thread")
    if asm is None:
        asm = x2.device.type == "cuda"
    kb = _kb(K)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    cnt = counters(x2.device)
    if split > 1 and (K % (64 * kb * split) or (K // (64 * split)) % max(1, g // 64)):
        split = 1  # K does not divide into equal runs of whole steps and groups
    n_whole = split_plan(tiles, split, _slots(x2.device, bm, bn)) if split > 1 else tiles
    if tiles - n_whole > cnt.numel():
        n_whole = tiles  # too many split tiles to count
    grid = (n_whole + (tiles - n_whole) * split,)
    ws = out2  # never touched when no tile is split
    if n_whole < tiles:
        ws = torch.empty((tiles - n_whole) * split * bn * bm, dtype=torch.float32, device=x2.device)
    zeros = qt.qzeros if qt.qzeros is not None else qt.scales  # unread when symmetric
    even_n = (N // 2) % (bn // 2) == 0 if glu else N % bn == 0  # (GLU: each half in whole half-tiles)
    qgemm4_kernel[grid](x2, qt.qweight, qt.scales, zeros, out2, ws, cnt, M, N, K, x2.stride(0), out2.stride(0),
                        n_whole, BN=bn, BM=bm, HAS_ZEROS=qt.qzeros is not None, TPG=g // 64, EVEN_M=M % bm == 0,
                        EVEN_N=even_n, ASM=asm, GLU=glu, NW=warps, KB=kb, SPLIT=split if n_whole < tiles else 1,
                        num_warps=warps, num_stages=stages)
    return out2
