"""Quantized matmul on the GPU: `qmatmul(x, qt, out=None, plan=None)` computes x @ dequantize(qt).T.

`make_plan(qt)` runs once at load time (before CUDA graph capture): it cuts every segment into K splits
and writes their metadata into small int32 tensors, one per launch mode, so a launch has a fixed grid and
never reads anything back on the host. Modes by the number of rows M of x:
- M == 1: FMA kernel, split-K partial sums combined by atomic adds; the weights are decoded two per
  instruction in fp16 pairs for fp16 activations (qmatmul_h2.py), else decoded and multiplied in fp32;
- 2 <= M <= SMALL_ROWS: the same kernel with tl.dot on 16/32-row tiles;
- larger M: the dot kernel with 64-row tiles up to DOT_MAX_ROWS; above, for plain 4-bit matrices where it
  measured faster (qgemm.use_for), the fused dequantize-GEMM of qgemm.py, else dequantize to a scratch (K, N)
  in the activation dtype + torch.matmul (cuBLAS) (`large_mode`, measured: docs/dev/qmatmul-notes.md).
An `Epilogue` folds the RMSNorm around the residual add and the SwiGLU activation into the store of the kernel
paths (M <= DOT_MAX_ROWS), so a decode layer needs no norm or SiLU launches; other paths apply the same
steps with torch ops afterwards (reference.matmul_epilogue).
The Hadamard rotation is applied to x before the kernel: one small Triton launch for up to SMALL_ROWS rows,
a tensor-core launch over the blocks above that (rotate_rows). For up to SMALL_ROWS rows of an act-order matrix
(input permutation), x is also put in the permuted order before the kernel (by the rotation's store, else one
gather launch), so the kernel reads it contiguously; larger M gathers in the kernel (the dot mode), and the
dequantize + cuBLAS path stores the weight's rows back in input order instead, so x is never gathered there.
Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (tests), with fp32 tl.dot operands."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ember.kernels import pdl, qgemm
from ember.kernels.epilogue import Epilogue
from ember.kernels.qmatmul_fp8 import Fp8Plan, fp8_plan, qmatmul_fp8
from ember.kernels.qmatmul_kernels import (
    dequant_kernel,
    gather_kernel,
    hadamard_kernel,
    qmatmul_kernel,
    rotate_rows_kernel,
)
from ember.quant.format import PLANES, QuantizedTensor
from ember.quant.hadamard import block_hadamard, hadamard_matrix

SMALL_ROWS = 32  # rows handled by the streaming kernel; above: LARGE_MODE
# Above SMALL_ROWS: "auto" = the Triton GEMM on packed weights up to DOT_MAX_ROWS rows, then dequantize +
# cuBLAS (H100, 4 bits, K x N 4096 x 14336: M=64 dot 81 us vs dequant 106 us; M=256 dot 186 vs 111 us).
LARGE_MODE = "auto"
DOT_MAX_ROWS = 64


@dataclass
class Launch:
    """One launch mode: split metadata (S, 8) int32 rows [k0, tiles, bits, g, q1row, q2row, srow, kk0]."""
    meta: torch.Tensor
    block_n: int
    num_warps: int
    num_stages: int
    block_m: int = 64  # rows per program of the "large" dot mode (the other modes pick theirs from M)
    # (tiles a split, tiles of K, group size, bits) when one segment covers K: the kernel computes each split's
    # row of `meta` instead of reading it (qmatmul_kernels._split_fields)
    uniform: tuple[int, int, int, int] | None = None

    @property
    def splits(self) -> int:
        return self.meta.shape[0]


@dataclass
class QMatmulPlan:
    modes: dict[str, Launch]  # "gemv", "small", "large"
    widths: int  # bit set of the widths present
    has_g32: bool
    large_mode: str  # "auto", "dequant" or "dot", for M > SMALL_ROWS ("dequant": never the fused qgemm.py)
    workspace: tuple[torch.Tensor, torch.Tensor]  # split-K sums (fp32) and counters, kept zero
    dequant_meta: dict[int, torch.Tensor] = field(default_factory=dict)  # bits -> meta of that width
    fp8: Fp8Plan | None = None  # set: the dequantize + cuBLAS rows run on fp8 tensor cores (qmatmul_fp8.py)
    inv_perm: torch.Tensor | None = None  # int32 (K,): position of each input in the permuted order (act-order)
    qgemm_g: int = 0  # group size when the fused dequantize-GEMM (qgemm.py) can take the many-row products, else 0


# (mode) -> (block_n, num_warps, num_stages, target programs per SM[, block_m for "large"]); per-shape
# overrides keyed by (K, N, bits, mode). Filled from scripts/bench_qmatmul.py / sweep_* measurements.
# gemv: BN = 128 x num_warps gives each thread 4 whole columns (the x values it loads serve all 4); the
# H100 sweep (docs/dev/qmatmul-notes.md) found (512, 4 warps, 8 programs per SM) best on average; 8 columns
# per thread (fewer instructions per weight) measured slower. gemv stages: software-pipelining depth of the
# one-row loop (qmatmul_kernels._loop_fma; 1 = none: in call G1 the best time per shape was the same at 1 and 3,
# and the small matrices were slower at 3, docs/dev/qmatmul-notes.md). EMBER_GEMV_STAGES / _PER_SM /
# _WIDE_STAGES override them for A/B runs.
# small (2-32 rows, tl.dot): 128 columns, 4 warps, 3 stages, 8 programs per SM from the eighth session's sweep at
# 8 rows (call K9): the layer's four matmuls 183.6 -> 119.9 us, the 8B decode at batch 8 1174 -> 1847 tok/s
# (was 64, 4, 2, 4; EMBER_SMALL_CFG=64/4/2/4 restores it).
DEFAULTS = {"gemv": (512, 4, 1, 8), "small": (128, 4, 3, 8), "large": (64, 4, 2, 2)}
# Wide outputs (gate/up, the head) are pipelined WIDE_STAGES deep when they have no TUNED entry: 8B decode
# 454.8 / 454.0 tok/s against 430.2 / 429.3 unpipelined (call H1, docs/benchmarks.md); the small matrices
# lose from it (call G1), so they keep the default. EMBER_GEMV_WIDE_STAGES overrides it (1 = off).
WIDE_N = 16384
WIDE_STAGES = 3
# Per-shape entries from the H100 sweeps with the packed-half decode (scripts/sweep_qmatmul.py) where the best
# config beat the default by more than 2%: 2 and 4 bits from call 4 (third session), 3 bits from call K3
# (eighth session, the one-plane 3-bit format and PDL mode 2; the 4-bit entries were still the best there).
# The 3-bit entries took the 8B decode at 3.125 bpw from 484.4 to 519.4 tok/s (K4), past 4.125 bpw (508.1).
TUNED: dict[tuple[int, int, int, str], tuple[int, ...]] = {
    (4096, 6144, 2, "gemv"): (1024, 8, 1, 8),  # 5.7 us (default 6.3)
    (4096, 4096, 2, "gemv"): (1024, 8, 1, 4),  # 5.4 (5.8)
    (4096, 28672, 2, "gemv"): (256, 1, 1, 16),  # 18.9 (19.7)
    (4096, 6144, 3, "gemv"): (1024, 8, 1, 16),  # 6.28 (the two-plane format's entry, 128/1/1/8: 8.87)
    (4096, 4096, 3, "gemv"): (1024, 8, 1, 2),  # 5.63 (5.88)
    (4096, 28672, 3, "gemv"): (512, 4, 1, 16),  # 23.49 (25.35 pipelined 3 deep)
    (14336, 4096, 3, "gemv"): (512, 4, 1, 16),  # 13.83 (14.31)
    (4096, 6144, 4, "gemv"): (128, 2, 1, 16),  # 7.2 (8.4)
    (14336, 4096, 4, "gemv"): (256, 2, 1, 8),  # 13.4 (14.4)
}
# A one-row kernel of several widths compiles a loop for each and takes the registers of the largest:
# 168 where 5 or 6 bits mix with others (5+4+3, 5+4, 6+5; offline sm_90), 3 programs of 4 warps an SM.
# Capped at 128 (no spills, offline), the mixed 14336x4096 (1/4 5 bits, 1/2 4, 1/4 3) took 15.4 us against
# 18.2 (H100, call N1). The other mixes compile to 80-128 registers uncapped; a cap lets ptxas use more
# (3+2: 80 -> 128), so they keep none. Offline, the cap spills with an input permutation (act-order, as the
# converter writes every matrix: 13-96 spill instructions), with zero points and groups of 32 together (6+5: 4)
# and on the fp32 decode (bf16: 6+5 bits, 10), so those keep none either. Zero points alone do not spill; an
# act-order matrix whose x qmatmul permutes first (below) is launched without the permutation and is capped.
MIXED_MAXNREG = 128
# Not kept: entries for matrices of several widths (bits 0) from a sweep of the 5+4+3 mix (call N4): qkv (256, 2, 1, 8)
# 8.6 us against 9.2, gate/up unpipelined 27.4 against 29.6; in the 8B decode (call N5, alternating) 2.5 bpw
# (3+2 bits) fell from 562.7 to 506.5 tok/s, 4.5 bpw from 437.1 to 434.6, 5.5 from 375.3 to 374.4.
# Not kept: 8-bit gate/up and down at (128, 2, 1, 8) were faster alone (46.68 / 24.10 us against 49.82 / 27.75,
# K3) but the 8.125 bpw decode fell from 284.1 to 259.9 tok/s with them (K4).


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def split_meta(segments: list[list[int]], tiles_per_split: int) -> torch.Tensor:
    """Cut each segment into runs of at most `tiles_per_split` blocks of 64 -> int32 (S, 8)."""
    rows = []
    for k0, k_len, bits, g, qrow, srow in segments:
        planes = PLANES[bits]
        q2base = qrow + k_len * planes[0] // 32  # first row of plane 2
        for kk in range(0, k_len, 64 * tiles_per_split):
            nt = min(tiles_per_split, (k_len - kk) // 64)
            q1 = qrow + kk * planes[0] // 32
            q2 = q2base + kk * planes[1] // 32 if len(planes) > 1 else 0
            rows.append([k0 + kk, nt, bits, g, q1, q2, srow, kk])
    return torch.tensor(rows, dtype=torch.int32)


def _launch(segments, K: int, N: int, mode: str, device: torch.device, tiles: int | None,
            config: tuple[int, int, int, int] | None) -> Launch:
    bits = segments[0][2] if len(segments) == 1 else 0
    tuned = TUNED if _use_tuned() else {}
    bn, warps, stages, per_sm, *bm = config or tuned.get((K, N, bits, mode), DEFAULTS[mode])
    if mode == "gemv" and config is None:  # A/B runs (gpu_check.sh)
        if N >= WIDE_N and (K, N, bits, mode) not in tuned:
            stages = int(os.environ.get("EMBER_GEMV_WIDE_STAGES") or WIDE_STAGES)
        stages = int(os.environ.get("EMBER_GEMV_STAGES") or stages)
        per_sm = int(os.environ.get("EMBER_GEMV_PER_SM") or per_sm)
    if mode == "small" and config is None and os.environ.get("EMBER_SMALL_CFG"):  # A/B: "bn/warps/stages/per_sm"
        bn, warps, stages, per_sm = (int(v) for v in re.split(r"[/,]", os.environ["EMBER_SMALL_CFG"]))
    if tiles is None:  # enough programs to fill the GPU: col blocks * splits ~ per_sm * SMs
        col_blocks = triton.cdiv(N, bn)
        want = max(1, per_sm * _sm_count(device) // col_blocks)
        tiles = max(1, triton.cdiv(K // 64, want))
    uniform = None
    # One-row launches only (the ones measured). 3 bits keep the table: 8B decode at 3.125 bpw 518.8 / 518.4
    # tok/s with it against 501.9 / 501.4 without (H100, call M4, alternating arms); 4.125 bpw went the other
    # way, 508.1 -> 516.4 (docs/benchmarks.md, tenth round). The tl.dot modes (batched decode, prefill chunks)
    # could take it too once measured.
    if mode == "gemv" and len(segments) == 1 and _uniform_on() and segments[0][2] != 3:
        k0, k_len, bits, g, qrow, srow = segments[0]
        assert k0 == 0 and qrow == 0 and srow == 0 and k_len == K, segments
        uniform = (tiles, k_len // 64, g, bits)
    return Launch(split_meta(segments, tiles).to(device), bn, warps, stages, *bm, uniform=uniform)


def make_plan(qt: QuantizedTensor, tiles_per_split: int | None = None,
              configs: dict[str, tuple[int, ...]] | None = None,
              large_mode: str = LARGE_MODE, fp8: bool = False) -> QMatmulPlan:
    """Precompute the launch metadata for qt (on qt's device). `tiles_per_split` overrides the split
    heuristic; `configs` {mode: (block_n, num_warps, num_stages, programs per SM)} the tuned table; `fp8`
    asks for the FP8 many-row path (taken where the matrix and the GPU allow it: qmatmul_fp8.fp8_reason)."""
    device = qt.qweight.device
    segs = qt.segments.cpu().tolist()
    K, N = qt.in_features, qt.out_features
    if qt.qweight.numel() >= 2**31 or qt.scales.numel() >= 2**31:
        raise ValueError("qmatmul uses int32 offsets: the matrix is too large")
    widths = 0
    for s in segs:
        widths |= 1 << s[2]
    configs = configs or {}
    modes = {m: _launch(segs, K, N, m, device, tiles_per_split, configs.get(m)) for m in DEFAULTS}
    deq = {b: split_meta([s for s in segs if s[2] == b], 4).to(device) for b in PLANES if widths >> b & 1}
    blocks = max(triton.cdiv(N, modes[m].block_n) for m in ("gemv", "small")) * triton.cdiv(SMALL_ROWS, 16)
    ws = _workspace(device, SMALL_ROWS * N, blocks)
    if qt.had:
        hadamard_matrix(qt.had, torch.float32, device)  # cached now, not during a graph capture
    inv = None
    if qt.perm is not None:
        inv = torch.empty_like(qt.perm)
        inv[qt.perm.long()] = torch.arange(K, dtype=qt.perm.dtype, device=device)
    g = qgemm.group_size(qt, segs)
    if g:
        qgemm.counters(device)  # made now, not during a graph capture
    return QMatmulPlan(modes, widths, any(s[3] == 32 for s in segs), large_mode, ws, deq,
                       fp8_plan(qt, deq) if fp8 else None, inv, g)


# Split-K workspace per device: fp32 sums and per-block counters, all zero between launches (the last
# program of each block re-zeroes what it used). Grown only by make_plan, before any graph capture; a grown
# buffer replaces the old one for new plans while the old one stays alive for graphs that captured it.
# NOTE: every plan on a device shares it, so two one-row or few-row launches must not run at the same time on
# different streams (their sums and counters would mix). The engine runs each device's model on one stream.
_WORKSPACES: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _workspace(device: torch.device, numel: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    ws = _WORKSPACES.setdefault(str(device), [])
    if not ws or ws[-1][0].numel() < numel or ws[-1][1].numel() < counters:
        numel = max(numel, ws[-1][0].numel() if ws else 0)
        counters = max(counters, ws[-1][1].numel() if ws else 0)
        ws.append((torch.zeros(numel, dtype=torch.float32, device=device),
                   torch.zeros(counters, dtype=torch.int32, device=device)))
    return ws[-1]


ONE_PLANE = (1 << 2, 1 << 3, 1 << 4, 1 << 8)  # `widths` of a matrix of one width stored in one bit plane


def _pdl_kwargs(plan: QMatmulPlan, device: torch.device, h2: int) -> dict:
    """PDL mode 2 (first weight tile loaded before the wait) for every matrix but one: the fp32 decode (bf16
    activations, or the tl.dot rows; h2 == 0) of more than two widths waits at the start (mode 1). Mode 2
    duplicates the tile code. With format version 1 that made ptxas take 30 s for a two-plane 3-bit kernel
    and 166 s for a mixed-width one (offline, sm_90), so until the seventh round only one-plane, one-width
    matrices (2, 3, 4, 8 bits) used it. Since the 3-bit plane (format version 2), Triton 3.6 compiles the
    packed-half kernels in 3-12.5 s, all six widths in one matrix included, and the fp32 decode of one or two
    widths in 3-9.5 s. Three widths on the fp32 decode took 27 s and six 56 s offline (against 4.7 and 8 s
    in mode 1), and ~290 s on the device with 8 test workers sharing its CPU (call K7); no benchmark runs
    that case. EMBER_PDL_ALL=0 restores the old rule (mode 2 for one-plane, one-width matrices only) for A/B
    runs."""
    kw = pdl.launch_kwargs(device)
    many_fp32 = h2 == 0 and plan.widths.bit_count() > 2
    if kw["PDL"] == 2 and plan.widths not in ONE_PLANE and (many_fp32 or not _pdl_all()):
        kw["PDL"] = 1
    return kw


def _h2_mode(x2: torch.Tensor) -> int:
    """Packed-half decode of the one-row path (qmatmul_h2.py) for fp16 activations: 2 = PTX on the GPU,
    1 = the same arithmetic in plain Triton (interpreter), 0 = off (bf16, or EMBER_H2=0). The kernel keeps
    8-bit segments on the fp32 decode."""
    if x2.dtype != torch.float16 or os.environ.get("EMBER_H2", "1") == "0":
        return 0
    return 1 if _interpreting() else 2


def _glu_fits(launch: Launch, N: int) -> bool:
    """GLU pairs gate column c with up column I + c in one program: I must be a multiple of BN/2 (and of 16)."""
    half = launch.block_n // 2
    return N % 2 == 0 and (N // 2) % half == 0 and half % 16 == 0


def _even_n(launch: Launch, N: int, glu: bool) -> bool:
    """EMBER_EVEN_N=1 and every column block whole (with GLU: of each half): the kernel drops its column masks.
    Off by default: 22 fewer SASS instructions a 4-bit tile (696 -> 674), yet the 8B decode fell from
    457.0 / 457.4 to 442.9 / 442.3 tok/s (call H4, docs/dev/qmatmul-notes.md)."""
    whole = (N // 2) % (launch.block_n // 2) == 0 if glu else N % launch.block_n == 0
    return whole and _even_n_on()


# The A/B switches read at every launch (gpu_check.sh; `ember bench` rows record them: bench/cli._switches).
def _use_tuned() -> bool:
    """EMBER_TUNED=0: the DEFAULTS launch configs only, no per-shape TUNED entry."""
    return os.environ.get("EMBER_TUNED", "1") != "0"


def _pdl_all() -> bool:
    """EMBER_PDL_ALL=0: PDL mode 2 for one-plane, one-width matrices only (_pdl_kwargs)."""
    return os.environ.get("EMBER_PDL_ALL", "1") != "0"


def _even_n_on() -> bool:
    """EMBER_EVEN_N=1: the constant column mask where the blocks are whole (_even_n)."""
    return os.environ.get("EMBER_EVEN_N", "0") == "1"


def _uniform_on() -> bool:
    """EMBER_UNIFORM=0: every split reads its metadata row, also for one-segment matrices (read by make_plan)."""
    return os.environ.get("EMBER_UNIFORM", "1") != "0"


def _maxnreg(plan: QMatmulPlan, use_dot: bool, h2: int, perm: bool) -> dict:
    """Register cap of the one-row launches (Triton's maxnreg): EMBER_GEMV_MAXNREG=n for all of them (A/B runs),
    else MIXED_MAXNREG for packed-half (h2) matrices of several widths with a two-plane one (5, 6 bits) among
    them, no input permutation read by the kernel and no groups of 32 (EMBER_MIXED_MAXNREG=0: none); read at
    every launch."""
    n = gemv_maxnreg()
    if (not n and h2 and not perm and not plan.has_g32 and plan.widths.bit_count() > 1
            and plan.widths & (1 << 5 | 1 << 6)):
        n = mixed_maxnreg()
    return {"maxnreg": n} if n and not use_dot and not _interpreting() else {}


def gemv_maxnreg() -> int:
    """EMBER_GEMV_MAXNREG (0 or unset: no cap for every one-row launch)."""
    return int(os.environ.get("EMBER_GEMV_MAXNREG") or 0)


def mixed_maxnreg() -> int:
    """EMBER_MIXED_MAXNREG, else MIXED_MAXNREG (0: no cap for the mixed-width matrices)."""
    return int(os.environ.get("EMBER_MIXED_MAXNREG") or MIXED_MAXNREG)


def _preperm_on() -> bool:
    """EMBER_PREPERM=0: the kernels gather x through the input permutation themselves (qmatmul's pre-permuted
    rows off); read at every launch (A/B runs)."""
    return os.environ.get("EMBER_PREPERM", "1") != "0"


def _epi_early() -> bool:
    """EMBER_EPI_EARLY=0 turns off loading the fused epilogue's operands (the residual tile, gamma, the rows'
    sum of squares) before the split-K atomics (qmatmul_store.store_tile); read at every launch (A/B runs)."""
    return os.environ.get("EMBER_EPI_EARLY", "1") != "0"


def _run_kernel(x2, qt, plan, launch: Launch, out2, use_dot: bool, block_m: int, epi: Epilogue | None = None,
                permuted: bool = False):
    """permuted: x2 is already in the matrix's permuted input order (the kernel reads it as it is)."""
    M, N = x2.shape[0], qt.out_features
    perm = None if permuted else qt.perm
    glu = epi is not None and epi.glu
    grid = (triton.cdiv(N, launch.block_n), launch.splits, triton.cdiv(M, block_m))
    atomic = launch.splits > 1
    if M <= SMALL_ROWS or not atomic:  # (one split stores directly: the workspace is never touched)
        buf, cnt = plan.workspace
    else:  # large "dot" mode split along K: a fresh zeroed workspace
        buf = torch.zeros(M * N, dtype=torch.float32, device=x2.device)
        cnt = torch.zeros(grid[0] * grid[2], dtype=torch.int32, device=x2.device)
    dummy = qt.qweight  # never read when the flag is off
    dot_dt = tl.float32 if _interpreting() else (tl.float16 if x2.dtype == torch.float16 else tl.bfloat16)
    norm_in = epi is not None and epi.rms_in is not None
    resid = epi is not None and epi.residual is not None
    res = epi.residual if resid else out2
    h2 = 0 if use_dot else _h2_mode(x2)
    qmatmul_kernel[grid](
        x2, qt.qweight, qt.scales, dummy if qt.qzeros is None else qt.qzeros,
        dummy if perm is None else perm, launch.meta, out2, buf, buf.view(torch.int32), cnt, M, N, x2.stride(0),
        out2.stride(0), -1, epi.rms_in if norm_in else buf, epi.eps if epi else 0.0,
        res, res.stride(0), epi.gamma if resid else buf, epi.rms_out if resid else buf,
        *(launch.uniform or (0, 0, 0, 0)),
        BM=block_m, BN=launch.block_n, WIDTHS=plan.widths, USE_DOT=use_dot, HAS_ZEROS=qt.qzeros is not None,
        HAS_PERM=perm is not None, HAS_G32=plan.has_g32, ATOMIC=atomic, DOT_DT=dot_dt,
        H2=h2, NORM_IN=norm_in, RESID=resid, GLU=glu,
        STAGES=1 if use_dot else launch.num_stages, EVEN_N=_even_n(launch, N, glu),
        EPI_EARLY=atomic and (norm_in or resid) and _epi_early(), UNIFORM=launch.uniform is not None,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        **_maxnreg(plan, use_dot, h2, perm is not None), **_pdl_kwargs(plan, x2.device, h2))


def rotate(x2: torch.Tensor, h: int, inv_perm: torch.Tensor | None = None) -> torch.Tensor:
    """block_hadamard of a few rows (M <= SMALL_ROWS) in one Triton launch; x2 (M, K) contiguous. With
    inv_perm (QMatmulPlan.inv_perm), the result comes out in the permuted input order: out[:, inv_perm[c]]
    is rotated column c."""
    if x2.shape[0] > SMALL_ROWS or h < 16:
        y = rotate_rows(x2, h)
        if inv_perm is None:
            return y
        out = torch.empty_like(y)
        out[:, inv_perm.long()] = y
        return out
    M, K = x2.shape
    out = torch.empty_like(x2)
    bj = min(h, 32)
    hadamard_kernel[(M, K // h, h // bj)](x2, out, x2 if inv_perm is None else inv_perm, x2.stride(0),
                                          out.stride(0), 1.0 / math.sqrt(h), H=h, BJ=bj,
                                          HAS_DST=inv_perm is not None, num_warps=4, **pdl.launch_kwargs(x2.device))
    return out


def rotate_rows(x2: torch.Tensor, h: int) -> torch.Tensor:
    """block_hadamard of many rows, x2 (M, K) contiguous fp16/bf16, in one launch (rotate_rows_kernel: tensor
    cores, fp32 sums, one rounding). It replaces the fp32 reference (a cast, a GEMM without tensor cores, a
    cast) for prompts. 8B act-order prefill, 512 tokens (H100, call P3): 17.5k tok/s before, 20.1k with the
    weight rows unpermuted alone (EMBER_ROTATE_MM=0), 24.1k with this kernel too.
    block_hadamard where the kernel does not apply (h < 16, EMBER_ROTATE_MM=0), and for bf16 under the
    interpreter (its dot has no bf16 and its casts to bf16 truncate; the GPU tests cover that case)."""
    interp = _interpreting()
    if h < 16 or not _rotate_mm_on() or not (x2.is_cuda or interp) or (interp and x2.dtype == torch.bfloat16):
        return block_hadamard(x2, h)
    out = torch.empty_like(x2)
    R = x2.numel() // h
    br = 64
    rotate_rows_kernel[(triton.cdiv(R, br),)](x2, out, R, 1.0 / math.sqrt(h), H=h, BR=br, num_warps=4,
                                             **pdl.launch_kwargs(x2.device))
    return out


def _qgemm_on() -> bool:
    """The fused dequantize-GEMM (qgemm.py) for many rows of a plain 4-bit matrix, instead of dequantize +
    cuBLAS (EMBER_QGEMM=0: off, for A/B runs)."""
    return os.environ.get("EMBER_QGEMM", "1") != "0"


def _rotate_mm_on() -> bool:
    """EMBER_ROTATE_MM=0: the many-row rotation through block_hadamard (fp32, no tensor cores); A/B runs."""
    return os.environ.get("EMBER_ROTATE_MM", "1") != "0"


def permute_inputs(x2: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x2[:, perm] for a few rows in one Triton launch (PDL-chained like the matmuls); x2 (M, K) contiguous."""
    M, K = x2.shape
    out = torch.empty_like(x2)
    bk = 1024
    gather_kernel[(M, triton.cdiv(K, bk))](x2, perm, out, K, x2.stride(0), out.stride(0), BK=bk, num_warps=4,
                                           **pdl.launch_kwargs(x2.device))
    return out


def dequantize_permuted(qt: QuantizedTensor, plan: QMatmulPlan, dtype: torch.dtype, out: torch.Tensor | None = None,
                        programs: int | None = None, pdl_on: bool = True, bn: int = 64,
                        warps: int = 4, unpermute: bool = False) -> torch.Tensor:
    """(K, N) weight in permuted input order (rotation not undone), by the Triton dequant kernel; into `out`
    (contiguous, at least K * N elements) when given. `programs` caps the grid (persistent programs) of
    `warps` warps over `bn` columns each. unpermute: rows in the input order instead (each permuted row
    stored at qt.perm[k]; the rotation is still not undone)."""
    rows = qt.perm if unpermute else None
    K, N = qt.in_features, qt.out_features
    w = torch.empty((K, N), dtype=dtype, device=qt.qweight.device) if out is None else out.view(-1)[:K * N].view(K, N)
    nb = triton.cdiv(N, bn)
    for bits, meta in plan.dequant_meta.items():
        p = PLANES[bits]
        total = nb * meta.shape[0]
        dequant_kernel[(min(total, programs or total),)](
            qt.qweight, qt.scales, qt.qweight if qt.qzeros is None else qt.qzeros, meta, w,
            meta if rows is None else rows, N, nb, total, BN=bn, P1=p[0], P2=p[1] if len(p) > 1 else 0,
            HAS_ZEROS=qt.qzeros is not None, HAS_ROWS=rows is not None, num_warps=warps,
            **(pdl.launch_kwargs(w.device) if pdl_on else {"PDL": 0}))
    return w


def _pick_launch(plan: QMatmulPlan, M: int) -> tuple[Launch, bool, int] | None:
    """(launch, use_dot, block_m) of the kernel path for M rows, or None for dequantize + cuBLAS."""
    if M == 1:
        return plan.modes["gemv"], False, 1
    if M <= SMALL_ROWS:
        return plan.modes["small"], True, 16 if M <= 16 else 32
    if plan.large_mode == "dot" or (plan.large_mode == "auto" and M <= DOT_MAX_ROWS):
        return plan.modes["large"], True, plan.modes["large"].block_m
    return None


def takes_fp8(plan: QMatmulPlan, M: int) -> bool:
    """Whether M rows go through the FP8 path (qmatmul_fp8.py) under this plan."""
    return plan.fp8 is not None and _pick_launch(plan, M) is None


def _takes_qgemm(plan: QMatmulPlan, x2: torch.Tensor, N: int, K: int) -> bool:
    """Whether the rows of x2, too many for the kernel paths (_pick_launch gave None), go through the fused
    dequantize-GEMM (qgemm.py) under this plan."""
    return (bool(plan.qgemm_g) and plan.large_mode == "auto" and plan.fp8 is None
            and qgemm.use_for(x2.shape[0], N, K) and _qgemm_on() and qgemm.takes(x2))


def fuses_glu(plan: QMatmulPlan, qt: QuantizedTensor, x: torch.Tensor) -> bool:
    """Whether qmatmul(x, qt, epi=Epilogue(glu=True)) does the SiLU-and-multiply inside the matmul (the fused
    dequantize-GEMM's store, for prompts) rather than after it: the MLP then asks for it."""
    x2 = x.reshape(-1, qt.in_features)
    return (_pick_launch(plan, x2.shape[0]) is None and _takes_qgemm(plan, x2, qt.out_features, qt.in_features)
            and qt.bias is None and qt.had == 0 and _glu_on())


def _glu_on() -> bool:
    """EMBER_QGEMM_GLU=0: the prompt's SiLU-and-multiply as its own pass after the fused dequantize-GEMM (A/B)."""
    return os.environ.get("EMBER_QGEMM_GLU", "1") != "0"


def qmatmul(x: torch.Tensor, qt: QuantizedTensor, out: torch.Tensor | None = None,
            plan: QMatmulPlan | None = None, epi: Epilogue | None = None) -> torch.Tensor:
    """x (..., K) fp16/bf16 -> (..., N) in x's dtype (written into `out` when given); with `epi`, the fused
    epilogue's output instead: (..., N), or (..., N/2) with glu."""
    K, N = qt.in_features, qt.out_features
    assert x.shape[-1] == K and x.dtype in (torch.float16, torch.bfloat16), (x.shape, x.dtype)
    assert qt.qweight.is_contiguous() and qt.scales.dtype == torch.float16
    plan = plan or make_plan(qt)
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    pick = _pick_launch(plan, M)
    # act-order matrices: a few rows of x are put in the permuted input order once (in the rotation's store
    # when there is one), so the matmul's programs read x contiguously instead of gathering it per tile
    permuted = qt.perm is not None and pick is not None and M <= SMALL_ROWS and _preperm_on()
    if qt.had:
        x2 = rotate(x2, qt.had, plan.inv_perm if permuted else None)
    elif permuted:
        x2 = permute_inputs(x2, qt.perm)
    use_qgemm = pick is None and _takes_qgemm(plan, x2, N, K)
    glu_only = epi is not None and epi.glu and epi.rms_in is None and epi.residual is None and qt.bias is None
    fused = (epi is not None and pick is not None and qt.bias is None and (not epi.glu or _glu_fits(pick[0], N))) \
        or (use_qgemm and glu_only)
    width = N // 2 if epi is not None and epi.glu else N  # of the returned tensor
    given = out
    if out is None or (epi is not None and not fused):  # unfused epilogue: the plain product first
        out = torch.empty((*x.shape[:-1], width if fused else N), dtype=x.dtype, device=x.device)
    out2 = out.view(M, -1)
    if pick is not None:
        launch, use_dot, block_m = pick
        _run_kernel(x2, qt, plan, launch, out2, use_dot, block_m, epi if fused else None, permuted)
    elif plan.fp8 is not None:
        qmatmul_fp8(x2, qt, plan.fp8, out2)
    elif use_qgemm:
        qgemm.qgemm(x2, qt, out2, plan.qgemm_g, qgemm.env_config(), glu=fused)
    else:
        # act-order: the weight's rows are stored back in input order rather than x gathered (M x K)
        torch.matmul(x2, dequantize_permuted(qt, plan, x.dtype, unpermute=qt.perm is not None), out=out2)
    if qt.bias is not None:
        out2 += qt.bias.to(out2.dtype)
    if epi is None or fused:
        return out
    from ember.kernels.reference import matmul_epilogue

    y = matmul_epilogue(out2.float(), epi, x.dtype)
    y = y.view(*x.shape[:-1], width)
    return y if given is None else given.copy_(y)
