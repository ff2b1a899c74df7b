"""Probe: a batch-1 4-bit GEMV written in Gluon (Triton 3.6's explicit-layout dialect) with the K split inside the
program, against the shipped kernel (`qmatmul`, split-K across programs) on the down projection's shape.

Why: the split-K reduction costs the standalone down projection (14336x4096) ~1 us of ~13.5 (docs/dev/qmatmul-notes.md,
sixteenth session), and plain Triton could not keep a thread's tile whole once K is spread over one program's warps
(eighteenth session, call W1: scalar x loads, layout conversions through shared memory). Gluon states the layout:
- words (8, KG, BN) in L3: a thread holds the 8 word rows of one block of 64 inputs for 4 columns (as the shipped
  loop does), BN / 4 lanes span the columns, the other lanes and the warps span KG blocks of 64 (KG: a multiple of
  warps x 128 / BN);
- x (8, KG) in L3 without its column axis: the 8 rows sit in one thread's registers, so it reads its 8 inputs as
  one 16-byte load, and one PRMT makes a pair (x[e], x[e + 32]) (inline PTX, pack=2);
- the packed-half decode of qmatmul_h2.py (LOP3, two HFMA2 a pair of weights, in inline PTX);
- after the loop, the KG partial sums are added across lanes and warps once, then stored (SPLIT = 1), or added into
  an fp32 output with atomics (SPLIT > 1; timing only: no counter, no read-back).
The fifth config field: 0 loads each step's words when it starts; 1 loads the next step's words and scales into
registers while this one is decoded; S >= 2 keeps S steps (words, scales and x) in flight in a shared-memory ring
filled by cp.async. Each thread copies and reads back only its own data, so a wait_group is enough (Triton still
puts barriers around it: 28-36 `BAR.SYNC` in the kernel, offline).
One width (4 bits), groups of 128, symmetric, fp16 activations, K a multiple of 64 x KG x SPLIT.
Measured (H100, calls W2-W3, docs/benchmarks.md, eighteenth round): right (rel. error 4.5e-4), but slower than the
shipped kernel. The best was 15.2-15.3 us against 14.5 us for the down projection, and 28.7 against 24.7 us for
gate/up. The ring (S >= 2, call X1, nineteenth round) is slower still: 19.2-22.1 us on the down projection at
32/8/32/1/S, 31-70 us with fewer columns a program. On gate/up (K = 4096: two steps a program, fewer than the ring's
stages) it gave wrong sums (nan); the cause was not looked into, so main() skips such configs.

    PYTHONPATH=/tmp/t36site:. .venv/bin/python scripts/probe_gluon_gemv.py --offline     # SASS of the loop, no GPU
    PYTHONPATH=. python3 scripts/probe_gluon_gemv.py --configs 32/4/16/1,32/8/32/1     # GPU: check and time
"""
from __future__ import annotations

import argparse
import re
import struct

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy


def _h(v: float) -> int:
    """The fp16 bits of v in both halves of an int32 (the packed-half constants)."""
    b = struct.unpack("<H", struct.pack("<e", v))[0]
    return b | (b << 16)


def _field_asm(j: int) -> str:
    """Inline PTX for field j of a 4-bit word: acc += (((src & mask) | fp16 1024 pair) * F + C) * x pair, where
    src is the word (fields 0, 1) or the word >> 8 (fields 2, 3), so that each half gives (v - 8) / 16 exactly."""
    s = 4 * j
    if s + 4 <= 10:
        mask, f, c = (15 << s) | (15 << (s + 16)), 2.0 ** -(s + 4), -(1024.0 + 8 * 2 ** s) * 2.0 ** -(s + 4)
    else:  # the word >> 8: bit s - 8 of each half
        mask, f, c = (15 << (s - 8)) | (15 << (s + 8)), 2.0 ** -(s - 4), -(1024.0 + 8 * 2 ** (s - 8)) * 2.0 ** -(s - 4)
    return ("{ .reg .b32 p, f, c; mov.b32 f, %d; mov.b32 c, %d; lop3.b32 p, $1, %d, 0x64006400, 0xEA; "
            "fma.rn.f16x2 p, p, f, c; fma.rn.f16x2 $0, p, $2, $3; }" % (_h(f), _h(c), mask))


ASM0 = gl.constexpr(_field_asm(0))
ASM1 = gl.constexpr(_field_asm(1))
ASM2 = gl.constexpr(_field_asm(2))
ASM3 = gl.constexpr(_field_asm(3))


@gluon.jit
def _pair_step(acc, src, xp, ASM: gl.constexpr):
    return gl.inline_asm_elementwise(ASM, "=r,r,r,r", [src, xp, acc], dtype=gl.int32, is_pure=True, pack=1)


@gluon.jit
def _halves_sum(acc):
    """f16x2 -> low + high as fp32 (added in fp16 first, as qmatmul_h2.halves_sum)."""
    return gl.inline_asm_elementwise(
        "{ .reg .b16 l, h; mov.b32 {l, h}, $1; add.rn.f16 l, l, h; cvt.f32.f16 $0, l; }",
        "=f,r", [acc], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _pack_x(xa, xb):
    """(x[e], x[e + 32]) fp16 pairs as int32."""
    # pack=2: each operand register holds two neighbouring rows' fp16 (r, r + 1): one PRMT a pair
    return gl.inline_asm_elementwise("prmt.b32 $0, $2, $3, 0x5410; prmt.b32 $1, $2, $3, 0x7632;", "=r,=r,r,r",
                                     [xa, xb], dtype=gl.int32, is_pure=True, pack=2)


@gluon.jit
def _x_step(x_ptr, k0, xoff):
    """The four fields' x pairs (8, KG) int32 of the step at input k0, all loaded before any is used."""
    x0 = _pack_x(gl.load(x_ptr + k0 + xoff), gl.load(x_ptr + k0 + 32 + xoff))
    x1 = _pack_x(gl.load(x_ptr + k0 + 8 + xoff), gl.load(x_ptr + k0 + 40 + xoff))
    x2 = _pack_x(gl.load(x_ptr + k0 + 16 + xoff), gl.load(x_ptr + k0 + 48 + xoff))
    x3 = _pack_x(gl.load(x_ptr + k0 + 24 + xoff), gl.load(x_ptr + k0 + 56 + xoff))
    return x0, x1, x2, x3


@gluon.jit
def _decode_step(acc, w, s, x0, x1, x2, x3):
    """acc (8, KG, BN) fp32 += one step's products (words w, scales s (KG, BN) fp16, x pairs of the 4 fields)."""
    w8 = w >> 8
    h = w & 0  # zeros in the layout of w
    h = _pair_step(h, w, gl.expand_dims(x0, 2), ASM0)
    h = _pair_step(h, w, gl.expand_dims(x1, 2), ASM1)
    h = _pair_step(h, w8, gl.expand_dims(x2, 2), ASM2)
    h = _pair_step(h, w8, gl.expand_dims(x3, 2), ASM3)
    return acc + _halves_sum(h) * (16.0 * gl.expand_dims(s.to(gl.float32), 0))


@gluon.jit
def _ring_fill(ring_w, ring_s, ring_x, st, t, kstart, q_ptr, s_ptr, x_ptr, N, rows3, cols3, soff, xoff,
               KG: gl.constexpr):
    """cp.async of step t's words, scales and x (the 64 inputs of each block, as 8 rows x 8 fields) into stage st."""
    k0 = kstart + t * (64 * KG)
    async_copy.async_copy_global_to_shared(ring_w.index(st), q_ptr + (k0 // 8 + rows3) * N + cols3)
    async_copy.async_copy_global_to_shared(ring_s.index(st), s_ptr + k0 // 128 * N + soff)
    for f in gl.static_range(8):  # x[k0 + 64 g + 8 f + r]: field f % 4 of the low (f < 4) or high half
        async_copy.async_copy_global_to_shared(ring_x.index(st * 8 + f), x_ptr + k0 + f * 8 + xoff)
    async_copy.commit_group()


@gluon.jit
def gemv_kg_kernel(x_ptr, q_ptr, s_ptr, out_ptr, acc_ptr, N, K, BN: gl.constexpr, KG: gl.constexpr,
                   SPLIT: gl.constexpr, W: gl.constexpr, PREFETCH: gl.constexpr):
    TN: gl.constexpr = BN // 4  # lanes across the columns (4 a thread); the other lanes and the warps take blocks
    L3: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1, 4], threads_per_warp=[1, 32 // TN, TN],
                                        warps_per_cta=[1, W, 1], order=[2, 1, 0])
    LX: gl.constexpr = gl.SliceLayout(2, L3)  # (8, KG): x rows of each block
    LS: gl.constexpr = gl.SliceLayout(0, L3)  # (KG, BN): scales
    n0 = gl.program_id(0) * BN
    ksteps = K // (64 * KG * SPLIT)
    kstart = gl.program_id(1) * ksteps * (64 * KG)
    r = gl.arange(0, 8, layout=gl.SliceLayout(1, LX))
    gx = gl.arange(0, KG, layout=gl.SliceLayout(0, LX))
    gs = gl.arange(0, KG, layout=gl.SliceLayout(1, LS))
    ns = gl.arange(0, BN, layout=gl.SliceLayout(0, LS))
    rows3 = gl.expand_dims(gl.expand_dims(r, 1) + gl.expand_dims(gx, 0) * 8, 2)  # (8, KG, 1) word row of the step
    cols3 = gl.expand_dims(gl.expand_dims(ns, 0), 0) + n0  # (1, 1, BN)
    xoff = gl.expand_dims(r, 1) + gl.expand_dims(gx, 0) * 64  # (8, KG) input of field 0, low half
    soff = gl.expand_dims(gs, 1) // 2 * N + gl.expand_dims(ns, 0) + n0  # (KG, BN): groups of 128 = 2 blocks
    acc = gl.zeros([8, KG, BN], gl.float32, L3)
    if PREFETCH >= 2:  # a ring of PREFETCH steps in shared memory, filled by cp.async: each thread copies and
        # later reads only its own words, scales and x, so a wait_group would suffice (Triton adds barriers anyway)
        SH3: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0])  # (the stage axis is not in it)
        SH2: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        ring_w = gl.allocate_shared_memory(gl.int32, [PREFETCH, 8, KG, BN], SH3)
        ring_s = gl.allocate_shared_memory(gl.float16, [PREFETCH, KG, BN], SH2)
        SHX: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0, 1])  # a block's 8 inputs contiguous
        ring_x = gl.allocate_shared_memory(gl.float16, [PREFETCH * 8, 8, KG], SHX)
        for i in gl.static_range(PREFETCH - 1):
            _ring_fill(ring_w, ring_s, ring_x, i, gl.minimum(i, ksteps - 1), kstart, q_ptr, s_ptr, x_ptr, N,
                       rows3, cols3, soff, xoff, KG)
        for t in range(ksteps):
            ahead = t + PREFETCH - 1
            _ring_fill(ring_w, ring_s, ring_x, ahead % PREFETCH, gl.minimum(ahead, ksteps - 1), kstart, q_ptr,
                       s_ptr, x_ptr, N, rows3, cols3, soff, xoff, KG)
            async_copy.wait_group(PREFETCH - 1)
            st = t % PREFETCH
            w = ring_w.index(st).load(L3)
            sc = ring_s.index(st).load(LS)
            x0 = _pack_x(ring_x.index(st * 8).load(LX), ring_x.index(st * 8 + 4).load(LX))
            x1 = _pack_x(ring_x.index(st * 8 + 1).load(LX), ring_x.index(st * 8 + 5).load(LX))
            x2 = _pack_x(ring_x.index(st * 8 + 2).load(LX), ring_x.index(st * 8 + 6).load(LX))
            x3 = _pack_x(ring_x.index(st * 8 + 3).load(LX), ring_x.index(st * 8 + 7).load(LX))
            acc = _decode_step(acc, w, sc, x0, x1, x2, x3)
    else:
        w = gl.load(q_ptr + (kstart // 8 + rows3) * N + cols3)  # (8, KG, BN) int32
        s = gl.load(s_ptr + kstart // 128 * N + soff)
        for t in range(ksteps):
            k0 = kstart + t * (64 * KG)
            if PREFETCH:  # the next step's words are in flight while this one is decoded
                k1 = kstart + gl.minimum(t + 1, ksteps - 1) * (64 * KG)  # (the last step re-reads its own)
                wn = gl.load(q_ptr + (k1 // 8 + rows3) * N + cols3)
                sn = gl.load(s_ptr + k1 // 128 * N + soff)
            elif t > 0:
                w = gl.load(q_ptr + (k0 // 8 + rows3) * N + cols3)
                s = gl.load(s_ptr + k0 // 128 * N + soff)
            x0, x1, x2, x3 = _x_step(x_ptr, k0, xoff)
            acc = _decode_step(acc, w, s, x0, x1, x2, x3)
            if PREFETCH:
                w = wn
                s = sn
    y = gl.sum(gl.sum(acc, axis=0), axis=0)  # (BN,)
    offs = gl.arange(0, BN, layout=y.type.layout) + n0
    if SPLIT == 1:
        gl.store(out_ptr + offs, y.to(gl.float16))
    else:
        gl.atomic_add(acc_ptr + offs, y)


def launch(x, q, s, out, acc, N, K, bn, warps, kg, split, prefetch=0):
    gemv_kg_kernel[(N // bn, split)](x, q, s, out, acc, N, K, BN=bn, KG=kg, SPLIT=split, W=warps, PREFETCH=prefetch,
                                     num_warps=warps)


def offline(bn: int, warps: int, kg: int, split: int, prefetch: int = 0) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    import triton

    from scripts.sass_check import disassemble, loops

    sig = {"x_ptr": "*fp16", "q_ptr": "*i32", "s_ptr": "*fp16", "out_ptr": "*fp16", "acc_ptr": "*fp32", "N": "i32",
           "K": "i32"}
    const = dict(BN=bn, KG=kg, SPLIT=split, W=warps, PREFETCH=prefetch)
    sig.update({k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}
    k = triton.compile(GluonASTSource(fn=gemv_kg_kernel, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    sass, res = disassemble(k.asm["cubin"])
    usage = res.strip().splitlines()[-1] if res.strip() else ""
    print(f"bn {bn} warps {warps} kg {kg} split {split} prefetch {prefetch}: {usage}")
    print("  BAR.SYNC in the kernel:", sass.count("BAR.SYNC"))
    for n, ops, ld in loops(sass):
        if n > 20:
            print(f"  loop: {n} SASS instructions; {ops}; {ld}")
    print("  global loads:", sorted(set(re.findall(r"LDG\.E[\.\w]*", sass))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="32/4/16/1,32/8/32/1,32/2/8/1,32/4/16/2,32/8/32/2",
                   help="comma-separated bn/warps/kg/split[/prefetch] (default: %(default)s)")
    p.add_argument("--shape", default="14336x4096", help="K x N (default 14336x4096)")
    p.add_argument("--offline", action="store_true", help="compile for sm_90 and print the SASS summary, no GPU")
    args = p.parse_args()
    cfgs = [tuple(int(v) for v in c.split("/")) for c in args.configs.split(",")]
    if args.offline:
        for c in cfgs:
            offline(*c)
        return
    from scripts.bench_qmatmul import copy_bandwidth, graph_time, random_qt

    from ember.kernels.qmatmul import make_plan, qmatmul
    from ember.quant.format import dequantize
    K, N = (int(v) for v in args.shape.split("x"))
    copy_bw = copy_bandwidth()
    qts = [random_qt(K, N, 4) for _ in range(4)]  # a few matrices, so the graph does not re-read L2
    assert all(q.segments.shape[0] == 1 and int(q.segments[0, 3]) == 128 for q in qts), "needs one 4-bit g128 segment"
    x = torch.randn(1, K, device="cuda").half()
    nbytes = qts[0].stored_bits() // 8 + K * 2 + N * 2  # as bench_qmatmul.bench_one counts a batch-1 call
    plans = [make_plan(q) for q in qts]
    t_ref = graph_time([lambda q=q, p=p: qmatmul(x, q, plan=p) for q, p in zip(qts, plans)])
    print(f"device {torch.cuda.get_device_name()}; copy {copy_bw / 1e9:.0f} GB/s; {K}x{N} 4 bits, "
          f"{nbytes / 1e6:.1f} MB")
    print(f"shipped qmatmul: {t_ref * 1e6:.2f} us, {nbytes / t_ref / copy_bw:.1%} of copy")
    ref = (x.float() @ dequantize(qts[0]).float().T)[0]
    for cfg in cfgs:
        bn, warps, kg, split, pf = (*cfg, 0)[:5]
        name = "/".join(map(str, cfg))
        if K % (64 * kg * split) or N % bn or kg % (warps * 128 // bn):
            print(f"{name}: skipped (shape)")
            continue
        if pf >= 2 and K // (64 * kg * split) < pf:
            print(f"{name}: skipped (a ring deeper than the program's steps gave wrong sums in X1)")
            continue
        out = torch.empty(N, device="cuda", dtype=torch.float16)
        acc = torch.zeros(N, device="cuda", dtype=torch.float32)
        try:
            launch(x[0], qts[0].qweight, qts[0].scales, out, acc, N, K, bn, warps, kg, split, pf)
            got = (out.float() if split == 1 else acc)
            err = ((got - ref).norm() / ref.norm()).item()
            t = graph_time([lambda q=q: launch(x[0], q.qweight, q.scales, out, acc, N, K, bn, warps, kg, split, pf)
                            for q in qts])
        except Exception as e:  # noqa: BLE001 (a config that does not compile is reported, the rest go on)
            print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        print(f"{name}: {t * 1e6:.2f} us, {nbytes / t / copy_bw:.1%} of copy, rel err {err:.1e}"
              f"{'' if split == 1 else ' (atomics into fp32, no read-back)'}")


if __name__ == "__main__":
    main()
