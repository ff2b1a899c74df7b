"""FP8 tensor-core path for the many-row (prefill) quantized matmul, opt-in (`EngineConfig.fp8_prefill`).

The default many-row path dequantizes a matrix to fp16 and runs cuBLAS on fp16 tensor cores. Hopper's FP8
tensor cores do twice the operations per cycle, and torch._scaled_mm (cuBLAS 12.9+) applies a float scale per
128 inputs of each row of both operands ("1x128 block scaling"), which is the ember format's own group scale
when the group size is a multiple of 128. So:
- weights: w[n, k] = s[g, n] * (q - z) with integer q - z. For widths up to 4 bits (and 5 bits with the
  symmetric zero 16), |q - z| <= 16, and every integer in [-16, 16] is exact in e4m3: the dequant kernel writes
  the codes q - z as fp8 (one byte a weight instead of two) and the scales go to cuBLAS unchanged. The weights
  lose nothing.
- activations: each run of 128 inputs of a row is scaled so that its largest magnitude is 448 (e4m3's maximum)
  and rounded to e4m3 (3 mantissa bits). This is the one approximation of the path: ~2.6% relative error
  of a matmul's output on random data, against ~0.02% for fp16 (docs/dev/qmatmul-notes.md, ninth session).
Matrices that don't fit (wider codes, groups of 32/64, segments not aligned to 128, N not a multiple of 16)
keep the fp16 path; `fp8_plan` says why.

Shapes: x (M, K) activations; a8 (M, K) e4m3; sa (K/128, M) fp32 (passed to cuBLAS transposed: (M, K/128)
with strides (1, M), the layout it asks for); w8 (N, K) e4m3 codes (passed as the column-major (K, N)
operand); sb (K/128, N) fp32 = the format's scales, one row per 128-input block.
On CPU (tests, TRITON_INTERPRET=1) the two Triton kernels run in the interpreter and the block-scaled GEMM is
emulated in fp32 (`block_scaled_mm`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ember.kernels import pdl
from ember.kernels.qmatmul_kernels import MAGIC, _codes64
from ember.quant.format import PLANES, QuantizedTensor

BLOCK_K = 128  # inputs per scale, the block cuBLAS's 1x128 scaling fixes
FP8_MAX = tl.constexpr(448.0)  # largest finite e4m3 value (a constexpr: the kernels read it)
M_ALIGN = 16  # rows are padded to this for cuBLAS (an odd M is rejected by its fp8 layouts)


@dataclass
class Fp8Plan:
    block_rows: torch.Tensor | None  # (K/128,) int64: the scale row of each 128-input block; None = row b
    dequant_meta: dict[int, torch.Tensor]  # bits -> split metadata (qmatmul.split_meta) of that width


def fp8_reason(qt: QuantizedTensor) -> str | None:
    """Why qt can't take the FP8 path (None: it can)."""
    N = qt.out_features
    if N % 16:
        return f"{N} outputs is not a multiple of 16"
    for k0, k_len, bits, g, _, _ in qt.segments.cpu().tolist():
        if bits > 5 or (bits == 5 and qt.qzeros is not None):
            return f"{bits}-bit codes minus their zero points are not all exact in fp8"
        if k0 % BLOCK_K or k_len % BLOCK_K or g % BLOCK_K:
            return f"segment at input {k0} (length {k_len}, group {g}) is not aligned to {BLOCK_K}-input blocks"
    return None


def fp8_device_ok(device: torch.device) -> bool:
    """Block-scaled fp8 GEMMs need Hopper (sm_90) and cuBLAS 12.9+; the interpreter emulates them."""
    if device.type != "cuda":
        return True  # CPU tensors only reach here under TRITON_INTERPRET=1 (tests)
    major = torch.cuda.get_device_capability(device)[0]
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return major == 9 and cuda >= (12, 9)


def fp8_gpu_ok(device: torch.device) -> bool:
    """Whether `device` is a GPU that runs the path (what --fp8-prefill asks of the machine)."""
    return device.type == "cuda" and fp8_device_ok(device)


def fp8_plan(qt: QuantizedTensor, dequant_meta: dict[int, torch.Tensor]) -> Fp8Plan | None:
    if fp8_reason(qt) is not None or not fp8_device_ok(qt.qweight.device):
        return None
    rows = []
    for _, k_len, _, g, _, srow in qt.segments.cpu().tolist():
        rows += [srow + kk // g for kk in range(0, k_len, BLOCK_K)]
    block_rows = torch.tensor(rows, dtype=torch.int64)
    same = block_rows.numel() == qt.scales.shape[0] and torch.equal(block_rows, torch.arange(len(rows)))
    return Fp8Plan(None if same else block_rows.to(qt.qweight.device), dequant_meta)


@triton.jit
def fp8_codes_kernel(q_ptr, z_ptr, meta_ptr, w_ptr, N, K, NB, BN: tl.constexpr, P1: tl.constexpr,
                     P2: tl.constexpr, HAS_ZEROS: tl.constexpr, PDL: tl.constexpr):
    """w (N, K) e4m3 = q - z in permuted input order, for the splits of one width (program: one split x BN
    columns). The scale stays out (cuBLAS applies it per 128-input block)."""
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)  # w may be memory a previous kernel still reads
    Z0: tl.constexpr = 1 << (P1 + P2 - 1)
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    offs64 = tl.arange(0, 64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    meta = meta_ptr + pid_s * 8
    k0, nt, g = tl.load(meta), tl.load(meta + 1), tl.load(meta + 3)
    k0 = tl.multiple_of(k0, 64)  # splits start on 64-input blocks: without the hint each byte is its own store
    q1row, q2row, srow, kk0 = tl.load(meta + 4), tl.load(meta + 5), tl.load(meta + 6), tl.load(meta + 7)
    for t in range(nt):
        f = _codes64(q_ptr, t, q1row, q2row, offs_n, n_mask, N, BN, P1, P2)  # (64, BN) 2^23 + code
        if HAS_ZEROS:
            zrow = srow + (kk0 + t * 64 + offs64) // g
            c = tl.load(z_ptr + zrow[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0).to(tl.float32)
            c += MAGIC
        else:
            c = MAGIC + Z0
        dst = w_ptr + offs_n[None, :] * K + (k0 + t * 64 + offs64)[:, None]
        tl.store(dst, (f - c).to(tl.float8e4nv), mask=n_mask[None, :])


@triton.jit
def _round_e4m3(v):
    """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32. The cast that
    follows only re-encodes it: the interpreter's own fp32 -> e4m3 cast drops the carry of a mantissa that
    rounds up into the next power of two (127.4 -> 64), so the kernel rounds by itself on every device."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)  # 3 mantissa bits
    sub = (v + 24576.0) - 24576.0  # below 2^-6 e4m3 is subnormal: multiples of 2^-9 (24576 = 1.5 * 2^14)
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def fp8_quant_act_kernel(x_ptr, perm_ptr, a_ptr, s_ptr, M, MP, K, stride_xm, BM: tl.constexpr,
                         HAS_PERM: tl.constexpr, SILU: tl.constexpr, PDL: tl.constexpr):
    """a[m, k] = e4m3(x[m, perm[k]] / s[b, m]) with s[b, m] = max |x[m, perm[128b:128b+128]]| / 448, for the
    BM rows x 128 inputs (block b) of one program. Rows M..MP-1 (cuBLAS padding) get zeros and scale 1.
    SILU: x is the gate/up projection's output (M, 2K) and the rounded input is silu(gate) * up, cast to x's
    dtype first as activation.silu_and_mul stores it (the down projection's input, without its round trip)."""
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    b = tl.program_id(1)
    cols = b * 128 + tl.arange(0, 128)
    src = tl.load(perm_ptr + cols) if HAS_PERM else cols
    ptrs = x_ptr + rows[:, None] * stride_xm + src[None, :]
    x = tl.load(ptrs, mask=(rows < M)[:, None], other=0.0).to(tl.float32)
    if SILU:
        up = tl.load(ptrs + K, mask=(rows < M)[:, None], other=0.0).to(tl.float32)
        x = (x / (1.0 + tl.exp(-x)) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # (BM,)
    s = tl.div_rn(tl.maximum(amax, 1e-20), FP8_MAX)  # IEEE division: the same scale as the torch reference
    v = tl.div_rn(x, s[:, None])
    v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)  # a rounding step past 448 would become NaN in e4m3
    tl.store(a_ptr + rows[:, None] * K + cols[None, :], _round_e4m3(v).to(tl.float8e4nv), mask=(rows < MP)[:, None])
    tl.store(s_ptr + b * MP + rows, tl.where(rows < M, s, 1.0), mask=rows < MP)


def fp8_codes(qt: QuantizedTensor, fplan: Fp8Plan, bn: int = 64, warps: int = 4) -> torch.Tensor:
    """(N, K) float8_e4m3fn codes q - z in permuted input order (scratch from the caching allocator)."""
    K, N = qt.in_features, qt.out_features
    w = torch.empty((N, K), dtype=torch.float8_e4m3fn, device=qt.qweight.device)
    nb = triton.cdiv(N, bn)
    for bits, meta in fplan.dequant_meta.items():
        p = PLANES[bits]
        fp8_codes_kernel[(nb, meta.shape[0])](
            qt.qweight, qt.qweight if qt.qzeros is None else qt.qzeros, meta, w, N, K, nb, BN=bn, P1=p[0],
            P2=p[1] if len(p) > 1 else 0, HAS_ZEROS=qt.qzeros is not None, num_warps=warps,
            **pdl.launch_kwargs(w.device))
    return w


def quantize_act(x2: torch.Tensor, perm: torch.Tensor | None, bm: int = 16,
                 silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, K) fp16/bf16 (unit stride along K) -> a8 (MP, K) e4m3 and sa (K/128, MP) fp32, MP = M rounded
    up to M_ALIGN, in permuted input order when perm is given. silu: x2 is (M, 2K) [gate | up] and the
    rounded values are silu(gate) * up (the down projection's input)."""
    M, K = x2.shape
    K = K // 2 if silu else K
    mp = triton.cdiv(M, M_ALIGN) * M_ALIGN
    a8 = torch.empty((mp, K), dtype=torch.float8_e4m3fn, device=x2.device)
    sa = torch.empty((K // BLOCK_K, mp), dtype=torch.float32, device=x2.device)
    fp8_quant_act_kernel[(triton.cdiv(mp, bm), K // BLOCK_K)](
        x2, x2 if perm is None else perm, a8, sa, M, mp, K, x2.stride(0), BM=bm, HAS_PERM=perm is not None,
        SILU=silu, num_warps=4, **pdl.launch_kwargs(x2.device))
    return a8, sa


def block_scaled_mm(a8: torch.Tensor, sa: torch.Tensor, w8: torch.Tensor, sb: torch.Tensor, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """(MP, K) x (N, K)^T with 1x128 block scales sa (K/128, MP), sb (K/128, N) -> (MP, N) in dtype:
    cuBLAS on CUDA, an fp32 emulation elsewhere (the interpreter tests)."""
    if a8.is_cuda:
        # (use_fast_accum: "not supported with 1x128 blockwise scaling", torch 2.11, call L6)
        return torch._scaled_mm(a8, w8.t(), scale_a=sa.t(), scale_b=sb, out_dtype=dtype, out=out)
    return emulated_block_scaled_mm(a8, sa, w8, sb, dtype, out)


def emulated_block_scaled_mm(a8: torch.Tensor, sa: torch.Tensor, w8: torch.Tensor, sb: torch.Tensor,
                             dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """block_scaled_mm in fp32 torch ops, on any device."""
    a = a8.float() * sa.t().repeat_interleave(BLOCK_K, dim=1)
    w = w8.float() * sb.t().repeat_interleave(BLOCK_K, dim=1)
    y = (a @ w.T).to(dtype)
    return y if out is None else out.copy_(y)


def qmatmul_fp8(x2: torch.Tensor, qt: QuantizedTensor, fplan: Fp8Plan, out2: torch.Tensor) -> None:
    """out2 (M, N) = x2 (M, K, already rotated) @ W.T through fp8: activations rounded per 128-input block."""
    a8, sa = quantize_act(x2, qt.perm)
    matmul_rounded(a8, sa, x2.shape[0], qt, fplan, out2)


def matmul_rounded(a8: torch.Tensor, sa: torch.Tensor, M: int, qt: QuantizedTensor, fplan: Fp8Plan,
                   out2: torch.Tensor) -> None:
    """out2 (M, N) = the first M rows of a8 (MP, K) with scales sa (quantize_act's output) @ W.T (no bias)."""
    w8 = fp8_codes(qt, fplan)
    sb = qt.scales if fplan.block_rows is None else qt.scales.index_select(0, fplan.block_rows)
    sb = sb.float()  # (K/128, N)
    if a8.shape[0] == M and out2.is_contiguous():
        block_scaled_mm(a8, sa, w8, sb, out2.dtype, out=out2)
    else:
        out2.copy_(block_scaled_mm(a8, sa, w8, sb, out2.dtype)[:M])
