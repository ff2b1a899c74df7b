"""Triton quantized matmul vs the float32 reference x @ dequantize(qt).T.

Tolerance: relative error ||out - ref|| / ||ref|| < 1e-2 (the output is rounded to fp16/bf16, the rotated
activations too; measured ~3e-4 for fp16 and ~4e-3 for bf16). On CPU the kernels run through
TRITON_INTERPRET=1 with tiny shapes; the gpu-marked tests repeat the grid with larger shapes on CUDA."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must be set before the kernels are decorated (imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ember.kernels.epilogue import Epilogue
from ember.kernels.qmatmul import make_plan, permute_inputs, qmatmul, rotate
from ember.quant.format import dequantize, pack
from ember.quant.hadamard import block_hadamard

WIDTHS = [2, 3, 4, 5, 6, 8]
MIXED = [(128, 5, 64), (64, 4, 32), (192, 3, 64), (128, 8, 128), (64, 2, 64), (128, 6, 128)]
TOL = 1e-2
DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_qt(spec, N, asym=False, use_perm=False, had=0, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    K = sum(s[0] for s in spec)
    codes = torch.cat([torch.randint(0, 1 << b, (N, k), generator=gen) for k, b, _ in spec], 1)
    G = sum(k // g for k, _, g in spec)
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.002).half()
    zeros = None
    if asym:  # zeros inside each segment's code range, so the weights stay of a realistic size
        zeros = torch.cat([torch.randint(0, 1 << b, (k // g, N), generator=gen) for k, b, g in spec]).to(torch.uint8)
    perm = torch.randperm(K, generator=gen) if use_perm else None
    b = torch.randn(N, generator=gen).half() if bias else None
    return pack(codes, scales, zeros, spec, perm=perm, had=had, bias=b).to(DEV)


def check(qt, M, dtype, tiles=None, lead=(), large_mode="auto", configs=None):
    x = torch.randn(*lead, M, qt.in_features, device=DEV).to(dtype)
    ref = x.float() @ dequantize(qt).to(DEV).T
    if qt.bias is not None:
        ref = ref + qt.bias.float()
    out = torch.full((*lead, M, qt.out_features), float("nan"), dtype=dtype, device=DEV)  # poisoned
    plan = make_plan(qt, tiles, large_mode=large_mode, configs=configs)
    res = qmatmul(x, qt, out=out, plan=plan)
    buf, cnt = plan.workspace
    assert not buf.any() and not cnt.any(), "split-K workspace not left zeroed"
    assert res is out and out.dtype == dtype
    assert torch.isfinite(out).all(), f"unwritten output at {torch.nonzero(~torch.isfinite(out))[0].tolist()}"
    err = (out.float() - ref).norm() / ref.norm()
    bad = ((out.float() - ref).abs() > 0.05 * ref.abs().max()).nonzero()
    assert err < TOL, f"rel err {err:.2e}, first mismatch at {bad[0].tolist() if len(bad) else None}"


@pytest.mark.parametrize("bits", WIDTHS)
def test_each_width(bits, monkeypatch):
    qt = make_qt([(192, bits, 64)], 40)  # K = 64*3, N not a multiple of the column block
    check(qt, 1, torch.float16)
    check(qt, 3, torch.float16, tiles=1)
    even = {"gemv": (32, 1, 1, 8), "small": (32, 4, 2, 4)}  # N a multiple of the block: no column masks
    monkeypatch.setenv("EMBER_EVEN_N", "1")
    qt = make_qt([(192, bits, 64)], 64, seed=1)
    check(qt, 1, torch.float16, configs=even)
    check(qt, 1, torch.bfloat16, configs=even)
    check(qt, 3, torch.float16, tiles=1, configs=even)


@pytest.mark.parametrize("M", [1, 17, 100])
def test_mixed_with_perm_hadamard_zeros(M):
    qt = make_qt(MIXED, 24, asym=True, use_perm=True, had=64, bias=True, seed=M)
    check(qt, M, torch.bfloat16 if M == 17 else torch.float16, tiles=2)


def test_bf16_single_row_and_leading_dims():
    qt = make_qt([(128, 4, 32), (64, 3, 64)], 16, use_perm=True)
    check(qt, 1, torch.bfloat16, tiles=1)
    check(qt, 3, torch.float16, lead=(2,))


def test_single_split_direct_store_and_dot_large_mode():
    qt = make_qt([(128, 6, 64)], 20, asym=True)
    check(qt, 1, torch.float16, tiles=1000)  # one split: no atomics, the kernel stores fp16 directly
    check(qt, 5, torch.bfloat16, tiles=1000)
    check(qt, 40, torch.float16, tiles=1, large_mode="dot")


def check_epilogue(qt, M, dtype, kind, tiles=None, configs=None, fused=True, monkeypatch=None):
    """qmatmul(x, qt, epi=Epilogue(...)) against the unfused ops. kind: "norm" (x = h * gamma, the 1/rms
    applied in the store: equals rms_norm(h) @ W^T), "resid" (residual add, next norm's weight, mean
    square), "glu" (silu(gate) * up of the [gate | up] product), "norm_glu" (both, the decode gate_up).
    fused=True also asserts the kernel did it (the torch fallback is made to fail)."""
    from ember.kernels import reference

    if fused and monkeypatch is not None:
        monkeypatch.setattr(reference, "matmul_epilogue", lambda *a: pytest.fail("torch fallback used"))
    gen = torch.Generator().manual_seed(M)
    K, N = qt.in_features, qt.out_features
    w = dequantize(qt).to(DEV)
    kw, eps = {}, 1e-5
    if kind in ("norm", "norm_glu"):  # un-normalized rows of very different size, and the norm's weight
        h = (torch.randn(M, K, generator=gen) * torch.logspace(-1, 2, M)[:, None]).to(DEV).to(dtype)
        g_in = (torch.rand(K, generator=gen) + 0.5).to(DEV).to(dtype)
        x = (h.float() * g_in.float()).to(dtype)
        kw = dict(rms_in=h.float().pow(2).mean(-1), eps=eps)
        ref = reference.rms_norm(h, g_in, eps).float() @ w.T
    else:
        x = torch.randn(M, K, generator=gen).to(DEV).to(dtype)
        ref = x.float() @ w.T
    if qt.bias is not None:
        ref = ref + qt.bias.float()
    if kind == "resid":
        res0 = torch.randn(M, N, generator=gen).to(DEV).to(dtype)
        gamma = (torch.rand(N, generator=gen) + 0.5).to(DEV).to(dtype)
        residual, rms_out = res0.clone(), torch.zeros(M, device=DEV)
        kw = dict(residual=residual, gamma=gamma, rms_out=rms_out, eps=eps)
        h_ref = (ref.to(dtype).float() + res0.float()).to(dtype).float()
    plan = make_plan(qt, tiles, configs=configs)
    out = qmatmul(x, qt, plan=plan, epi=Epilogue(glu=kind.endswith("glu"), **kw))
    buf, cnt = plan.workspace
    assert not buf.any() and not cnt.any(), "split-K workspace not left zeroed"
    assert out.dtype == dtype

    def close(a, b, what):
        err = (a.float() - b).norm() / b.norm()
        assert err < TOL, f"{what}: rel err {err:.2e}"

    if kind.endswith("glu"):
        gate, up = ref.chunk(2, dim=-1)
        assert out.shape == (M, N // 2)
        close(out, torch.nn.functional.silu(gate) * up, "silu(gate) * up")
    elif kind == "resid":
        assert out.shape == (M, N)
        close(residual, h_ref, "residual")
        close(rms_out, h_ref.pow(2).mean(-1), "mean square")
        close(out, h_ref * gamma.float(), "h * gamma")
        normed = out.float() * torch.rsqrt(rms_out + eps)[:, None]
        close(normed, reference.add_rms_norm(ref.to(dtype), res0, gamma, eps)[0].float(), "add_rms_norm")
    else:
        close(out, ref, "rms_norm(h) @ W^T")


SMALL_BLOCKS = {"gemv": (32, 1, 2, 8), "small": (32, 1, 2, 4)}  # BN 32: GLU pairs fit I = 48 (16-column halves)


@pytest.mark.parametrize("kind", ["norm", "resid", "glu", "norm_glu"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("early", ["0", "1"], ids=["operands_late", "operands_early"])
def test_fused_epilogue(kind, M, early, monkeypatch):
    """Split-K (tiles=1) with the epilogue's operands loaded by the last program or by every program before
    its atomics (EMBER_EPI_EARLY)."""
    monkeypatch.setenv("EMBER_EPI_EARLY", early)
    spec, N = ([(128, 4, 64)], 96) if M == 1 else ([(64, 3, 32), (64, 8, 64)], 96)
    qt = make_qt(spec, N, asym=M == 3, use_perm=M == 3, seed=M)
    check_epilogue(qt, M, torch.float16 if M == 1 else torch.bfloat16, kind, tiles=1, configs=SMALL_BLOCKS,
                   monkeypatch=monkeypatch)


@pytest.mark.parametrize("case", ["many_rows", "glu_halves_do_not_fit", "bias"])
def test_fused_epilogue_fallbacks(case):
    """Where the kernel cannot fold it (dequantize + cuBLAS rows, I not a multiple of BN/2, a bias), the
    same epilogue runs as torch ops."""
    if case == "many_rows":
        check_epilogue(make_qt([(64, 4, 64)], 40), 70, torch.float16, "resid", fused=False)
    elif case == "glu_halves_do_not_fit":
        check_epilogue(make_qt([(64, 4, 64)], 40), 1, torch.float16, "norm_glu", fused=False)
    else:
        check_epilogue(make_qt([(64, 5, 64)], 48, bias=True), 1, torch.float16, "resid", fused=False)


@pytest.mark.parametrize("programs,cfg,dtype", [
    (None, {}, torch.float16), (3, {}, torch.float16), (3, {"bn": 128, "warps": 8}, torch.float16),
    (None, {}, torch.bfloat16)], ids=["grid", "persistent3", "persistent3_bn128", "bf16"])
def test_dequantize_permuted_every_width(programs, cfg, dtype):
    """The dequant kernel of the many-row path (every width, zeros, a permutation, a ragged last column
    block), on a full grid and with 3 persistent programs striding over the work items, into a larger
    poisoned buffer: exactly (q - z) * s in permuted input order, nothing else written."""
    from ember.kernels.qmatmul import dequantize_permuted

    qt = make_qt(MIXED + [(640, 4, 64)], 200, asym=True, use_perm=True, seed=5)  # 4 column blocks, 3 splits
    K, N = qt.in_features, qt.out_features
    buf = torch.full((K * N + 7,), float("nan"), dtype=dtype, device=DEV)
    w = dequantize_permuted(qt, make_plan(qt), dtype, out=buf, programs=programs, **cfg)
    ref = dequantize(qt).to(DEV).T[qt.perm.long()]  # (K, N), row k = input perm[k]
    assert w.shape == (K, N) and w.data_ptr() == buf.data_ptr()
    same(w, ref)
    assert buf[K * N:].isnan().all()
    # unpermute (the prompt's path): rows stored back in input order, so x needs no gather
    buf.fill_(float("nan"))
    w = dequantize_permuted(qt, make_plan(qt), dtype, out=buf, programs=programs, unpermute=True, **cfg)
    same(w, dequantize(qt).to(DEV).T)
    assert buf[K * N:].isnan().all()

    sym = make_qt([(128, 4, 64), (64, 2, 32), (64, 8, 64)], 72, seed=6)  # symmetric: the constant zero point
    same(dequantize_permuted(sym, make_plan(sym), dtype, programs=programs, **cfg), dequantize(sym).to(DEV).T)


def same(w, ref):
    """fp16: the same bits as the fp32 reference cast; bf16: within one unit in the last place (the
    interpreter's fp32 -> bf16 cast truncates, the GPU's rounds)."""
    if w.dtype == torch.float16:
        assert torch.equal(w.float(), ref.half().float())
    else:
        assert ((w.float() - ref).abs() <= ref.abs() * 2.0 ** -7).all()


@pytest.mark.parametrize("h", [16, 64])
def test_rotate_kernel_matches_block_hadamard(h):
    x = torch.randn(3, 4 * h, device=DEV).half()
    ref = block_hadamard(x.double(), h)
    out = rotate(x, h)
    assert out.dtype == x.dtype and ((out.double() - ref).norm() / ref.norm()) < 2e-3
    # act-order: the rotated row stored in a matrix's permuted input order (out[:, k] = rotated[:, perm[k]])
    perm = torch.randperm(4 * h, device=DEV).int()
    inv = torch.empty_like(perm)
    inv[perm.long()] = torch.arange(4 * h, dtype=perm.dtype, device=DEV)
    assert torch.equal(rotate(x, h, inv), out[:, perm.long()])
    assert torch.equal(rotate(x.repeat(12, 1), h, inv), block_hadamard(x.repeat(12, 1), h)[:, perm.long()])  # torch


def rotate_rows_check(h, dtype, rows):
    """rotate_rows (the prompt's rotation: one tensor-core product with the +-1 matrix per block of rows, fp32
    sums, scaled, rounded once) against the exact rotation (float64), with the bound the fp32 reference
    (block_hadamard) meets too: half a unit in the last place for the one rounding, plus h fp32 roundings of
    the block's summed magnitudes (rows whose sizes span four orders of magnitude, with sums that cancel far
    below their terms; the row count not a multiple of the kernel's block)."""
    from ember.kernels.qmatmul import rotate_rows

    gen = torch.Generator().manual_seed(h)
    x = (torch.randn(rows, 6 * h, generator=gen) * torch.logspace(-2, 2, rows)[:, None]).to(DEV).to(dtype)
    exact = block_hadamard(x.double(), h)
    mag = (x.double().abs().view(rows, -1, h).sum(-1, keepdim=True) / h ** 0.5).expand(-1, -1, h).reshape(rows, -1)
    half_ulp = 2.0 ** (-11 if dtype == torch.float16 else -8)
    bound = exact.abs() * half_ulp + mag * h * 2.0 ** -23 + 2.0 ** -25
    out = rotate_rows(x, h)
    assert out.dtype == dtype and out.shape == x.shape
    for name, y in (("rotate_rows", out), ("block_hadamard", block_hadamard(x, h))):
        err = (y.double() - exact).abs()
        bad = err > bound
        assert not bad.any(), f"{name}: {int(bad.sum())} values past the bound, worst {(err / bound).max():.2f}x"


@pytest.mark.parametrize("h", [16, 128])
def test_rotate_rows_matches_block_hadamard(h):
    rotate_rows_check(h, torch.float16, 37)  # bf16: GPU only (rotate_rows)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("h", [16, 128])
def test_gpu_rotate_rows_matches_block_hadamard(h, dtype):
    rotate_rows_check(h, dtype, 700)


@pytest.mark.parametrize("K", [64, 1500])
def test_gather_kernel_matches_indexing(K):
    """permute_inputs (gather_kernel) against x[:, perm], K not a multiple of its block."""
    x = torch.randn(3, K, device=DEV).half()
    perm = torch.randperm(K, device=DEV).int()
    assert torch.equal(permute_inputs(x, perm), x[:, perm.long()])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", WIDTHS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("M", [1, 3, 17, 33, 100], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_grid(bits, M, dtype):
    qt = make_qt([(64 * 23, bits, 64)], 1000, had=64 if M == 3 else 0)  # K = 64 * odd
    check(qt, M, dtype)
    if M == 33:  # "auto" picked the Triton GEMM; the other large-M path too
        check(qt, M, dtype, large_mode="dequant")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("stages", [1, 3], ids=lambda s: f"st{s}")
def test_gpu_m1_pipelined_loop(bits, stages, monkeypatch):
    """The one-row loop, plain and software-pipelined, over several tiles per split (the grid test above gives
    a split one tile): splits of 7 tiles, the last one short, and one split of all 23 tiles; then groups of 32,
    zeros and a permutation next to a 4-bit segment (two kernel compilations per case)."""
    qt = make_qt([(64 * 23, bits, 64)], 1000)
    for tiles in (7, 23):
        check(qt, 1, torch.float16, tiles=tiles, configs={"gemv": (256, 2, stages, 8)})
    qt = make_qt([(64 * 23, bits, 64)], 1024, seed=1)  # whole column blocks, masks dropped (EMBER_EVEN_N=1)
    with monkeypatch.context() as m:
        m.setenv("EMBER_EVEN_N", "1")
        check(qt, 1, torch.float16, tiles=7, configs={"gemv": (256, 2, stages, 8)})
    qt = make_qt([(64 * 10, bits, 32), (64 * 13, 4, 64)], 640, asym=True, use_perm=True)
    check(qt, 1, torch.float16, tiles=5, configs={"gemv": (512, 4, stages, 8)})


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("M", [1, 3, 17, 33, 100])
def test_gpu_mixed(M):
    spec = [(1024, 5, 128), (512, 4, 32), (1536, 3, 64), (64, 8, 64), (960, 6, 64)]
    qt = make_qt(spec, 777, asym=True, use_perm=True, had=64, bias=True)
    check(qt, M, torch.float16)
    check(qt, M, torch.bfloat16, tiles=3)
    if M == 1:  # symmetric and unpermuted: the one-row launch under the mixed-width register cap (MIXED_MAXNREG)
        check(make_qt(spec, 777, seed=1), 1, torch.float16, tiles=3)


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_capture():
    qt = make_qt([(2048, 4, 128)], 512, use_perm=True, had=128)
    plan = make_plan(qt)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.float16)
    out = torch.empty(1, 512, device="cuda", dtype=torch.float16)
    qmatmul(x, qt, out=out, plan=plan)  # warm up (compiles)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        qmatmul(x, qt, out=out, plan=plan)
    x.copy_(torch.randn_like(x))
    g.replay()
    ref = x.float() @ dequantize(qt).cuda().T
    assert ((out.float() - ref).norm() / ref.norm()) < TOL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["norm", "resid", "glu", "norm_glu"])
@pytest.mark.parametrize("M", [1, 5, 32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_fused_epilogue(kind, M, dtype, monkeypatch):
    """The decode layer's epilogues (Llama-like widths: I a multiple of the column blocks)."""
    check_epilogue(make_qt([(64 * 23, 4, 64)], 1024), M, dtype, kind, monkeypatch=monkeypatch)
    spec = [(1024, 5, 128), (512, 4, 32), (1536, 3, 64), (64, 8, 64), (960, 6, 64)]
    check_epilogue(make_qt(spec, 2048, asym=True, use_perm=True, had=64), M, dtype, kind, monkeypatch=monkeypatch)


@pytest.mark.parametrize("block_m", [32, 128])
def test_large_dot_mode_block_rows(block_m):
    """The fused dequant-GEMM ("large" dot mode) with other row tiles and one K split (no atomics)."""
    qt = make_qt([(128, 4, 64), (64, 3, 32)], 24, asym=True, use_perm=True, bias=True)
    M = block_m + 3
    x = torch.randn(M, qt.in_features, device=DEV).half()
    ref = x.float() @ dequantize(qt).to(DEV).T + qt.bias.float()
    plan = make_plan(qt, configs={"large": (16, 4, 2, 0, block_m)}, large_mode="dot")
    assert plan.modes["large"].block_m == block_m and plan.modes["large"].splits == 2  # one per segment
    out = qmatmul(x, qt, plan=plan)
    assert ((out.float() - ref).norm() / ref.norm()) < TOL


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym_perm_g32"])
def test_packed_half_decode_matches_fp32_path(asym, monkeypatch):
    """The one-row packed-half decode (qmatmul_h2.py: fp16 pair products, 1/16 headroom, first plane centred,
    zero points as a correction) against the fp32 decode on the same inputs, for every width it serves and for
    activations large enough that fp16 sums without the headroom would overflow."""
    spec = [(128, 2, 64), (64, 3, 32), (128, 4, 128), (64, 5, 64), (128, 6, 32)] if asym else [(192, 4, 64)]
    qt = make_qt(spec, 40, asym=asym, use_perm=asym)
    for scale in (1.0, 3000.0):
        x = torch.randn(1, qt.in_features, device=DEV).half() * scale
        ref = x.float() @ dequantize(qt).to(DEV).T
        outs = {}
        for mode in ("0", "1"):
            monkeypatch.setenv("EMBER_H2", mode)
            outs[mode] = qmatmul(x, qt, plan=make_plan(qt, 2)).float()
        assert torch.isfinite(outs["1"]).all() and not torch.equal(outs["0"], outs["1"])  # two distinct paths
        err_h2 = ((outs["1"] - ref).norm() / ref.norm()).item()
        err_fp32 = ((outs["0"] - ref).norm() / ref.norm()).item()
        assert err_h2 < 2e-3 and err_fp32 < 5e-4, (scale, err_h2, err_fp32)


@pytest.mark.parametrize("spec", [[(384, 4, 192)], [(448, 3, 448), (64, 8, 64)], [(1024, 4, 1024)]],
                         ids=["g192", "g_whole_segment", "g1024"])
def test_group_sizes_not_powers_of_two(spec):
    """The one-row path finds a tile's scale row as (k + 16) * (1/g) truncated (qmatmul_kernels._group):
    groups that are multiples of 64 but not powers of two, and one group per segment (GPTQ group_size -1)."""
    qt = make_qt(spec, 24, asym=True)
    check(qt, 1, torch.float16, tiles=1)
    check(qt, 1, torch.bfloat16, tiles=2)


def test_launch_tables_are_valid():
    """Every DEFAULTS / TUNED entry is launchable: power-of-two block and warps (Triton refuses other warp
    counts, and a block of columns is a tl.arange), at least one pipelining stage and one program per SM."""
    from ember.kernels.qmatmul import DEFAULTS, TUNED

    for key, (bn, warps, stages, per_sm, *_) in [*DEFAULTS.items(), *TUNED.items()]:
        assert bn & (bn - 1) == 0 and warps & (warps - 1) == 0 and stages >= 1 and per_sm >= 1, key


def test_gemv_switches_for_ab_runs(monkeypatch):
    """Wide one-row launches (N >= WIDE_N, no TUNED entry) are pipelined WIDE_STAGES deep, the others not;
    EMBER_GEMV_WIDE_STAGES overrides the wide ones (1 = off); EMBER_GEMV_STAGES / _PER_SM every one-row launch."""
    from ember.kernels.qmatmul import TUNED, WIDE_N, WIDE_STAGES, _launch

    def launch(K, N):
        return _launch([[0, K, 4, 128, 0, 0]], K, N, "gemv", torch.device("cpu"), None, None)

    assert (4096, WIDE_N, 4, "gemv") not in TUNED and (4096, 4096, 4, "gemv") not in TUNED
    assert WIDE_STAGES > 1 and launch(4096, WIDE_N).num_stages == WIDE_STAGES
    assert launch(4096, WIDE_N - 1).num_stages == launch(4096, 4096).num_stages == 1
    monkeypatch.setenv("EMBER_GEMV_WIDE_STAGES", "1")
    assert launch(4096, WIDE_N).num_stages == 1
    monkeypatch.setenv("EMBER_GEMV_STAGES", "2")
    monkeypatch.setenv("EMBER_GEMV_PER_SM", "1")  # 1 program per SM on the CPU's "2 SMs": 2 splits of 32 tiles
    assert launch(4096, WIDE_N).num_stages == launch(4096, 4096).num_stages == 2
    from ember.kernels.qmatmul import _even_n  # EMBER_EVEN_N=1: whole column blocks drop the masks

    gemv = launch(4096, 4096)
    assert not _even_n(gemv, 4096, False)  # off by default (slower, call H4)
    monkeypatch.setenv("EMBER_EVEN_N", "1")
    assert _even_n(gemv, 4096, False) and not _even_n(gemv, 4096 + 128, False)
    assert _even_n(gemv, 2 * 4096, True) and not _even_n(gemv, 2 * (4096 + 128), True)
    assert launch(4096, 512).splits == 2


@pytest.mark.parametrize("had", [0, 64], ids=["gather", "rotation"])
@pytest.mark.parametrize("M", [1, 3])
def test_prepermuted_rows_equal_the_kernel_gather(had, M, monkeypatch):
    """Act-order matrices: the rows of x put in the permuted input order before the kernel (by the rotation's
    store, or by gather_kernel without a rotation) give the same bits as the kernel gathering x through the
    permutation itself (EMBER_PREPERM=0), one row (packed halves, zero points) and the tl.dot rows."""
    prepermuted_case(make_qt(MIXED[:4], 40, asym=True, use_perm=True, had=had, seed=M + had), M, 2, monkeypatch)


def prepermuted_case(qt, M, tiles, monkeypatch):
    x = torch.randn(M, qt.in_features, device=DEV).half()
    outs = {}
    for on in ("0", "1"):
        monkeypatch.setenv("EMBER_PREPERM", on)
        outs[on] = qmatmul(x, qt, plan=make_plan(qt, tiles))
    ref = x.float() @ dequantize(qt).to(DEV).T
    errs = [((outs[on].float() - ref).norm() / ref.norm()).item() for on in ("0", "1")]
    diff = ((outs["0"].float() - outs["1"].float()).norm() / ref.norm()).item()
    assert errs[1] < TOL, errs
    if DEV == "cpu":  # the interpreter runs the same arithmetic: the same bits
        assert torch.equal(outs["0"], outs["1"])
    else:  # two compiled kernels (x read contiguously / gathered) may sum in another order: rounding apart
        assert diff < 2e-3 and errs[1] < 1.5 * errs[0] + 1e-4, (diff, errs)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("had", [0, 128], ids=["gather", "rotation"])
@pytest.mark.parametrize("M", [1, 5])
def test_gpu_prepermuted_rows(had, M, monkeypatch):
    """test_prepermuted_rows_equal_the_kernel_gather on the GPU (PTX decode), a 4-bit and a mixed matrix."""
    prepermuted_case(make_qt([(64 * 23, 4, 64)], 1000, asym=True, use_perm=True, had=had and 64), M, 7,
                     monkeypatch)
    prepermuted_case(make_qt([(1024, 5, 128), (512, 4, 128), (1536, 3, 128)], 777, asym=True, use_perm=True,
                             had=had), M, 3, monkeypatch)


def test_register_cap_rule(monkeypatch):
    """One-row packed-half launches of matrices that mix a two-plane width (5, 6 bits) with others, without an
    input permutation read by the kernel or groups of 32, are capped at MIXED_MAXNREG registers; other matrices and the tl.dot launches are not; EMBER_GEMV_MAXNREG caps every
    one-row launch, EMBER_MIXED_MAXNREG=0 lifts the mixed cap. (The interpreter takes no cap: forced off here.)"""
    from ember.kernels import qmatmul as qm

    monkeypatch.setattr(qm, "_interpreting", lambda: False)

    def cap(spec, use_dot=False, h2=2, perm=False):
        return qm._maxnreg(make_plan(make_qt(spec, 16)), use_dot, h2, perm).get("maxnreg", 0)

    assert cap([(128, 5, 64), (64, 4, 64), (64, 3, 64)]) == cap([(64, 6, 64), (64, 5, 64)]) == qm.MIXED_MAXNREG
    assert cap([(64, 3, 64), (64, 2, 64)]) == cap([(128, 5, 64)]) == cap([(128, 4, 64)]) == 0
    assert cap([(128, 5, 64), (64, 4, 64)], use_dot=True) == 0
    assert cap([(128, 5, 64), (64, 4, 64)], perm=True) == cap([(128, 5, 64), (64, 4, 64)], h2=0) == 0
    assert cap([(128, 5, 32), (64, 4, 64)]) == 0  # groups of 32
    monkeypatch.setenv("EMBER_MIXED_MAXNREG", "0")
    assert cap([(128, 5, 64), (64, 4, 64)]) == 0
    monkeypatch.setenv("EMBER_GEMV_MAXNREG", "96")
    assert cap([(128, 4, 64)]) == cap([(128, 5, 64), (64, 4, 64)], perm=True) == 96 and cap([(128, 4, 64)], True) == 0


def test_pdl_mode_rule(monkeypatch):
    """Mode 2 everywhere except the fp32 decode (bf16 activations, tl.dot rows) of more than two widths,
    whose duplicated tile took ptxas minutes on the device (qmatmul._pdl_kwargs); EMBER_PDL_ALL=0 keeps
    mode 2 for one-plane, one-width matrices only."""
    from types import SimpleNamespace

    from ember.kernels import pdl
    from ember.kernels.qmatmul import _pdl_kwargs

    monkeypatch.setattr(pdl, "launch_kwargs", lambda device: {"launch_pdl": True, "PDL": 2})
    mode = lambda widths, h2: _pdl_kwargs(SimpleNamespace(widths=sum(1 << b for b in widths)), None, h2)["PDL"]  # noqa: E731
    assert [mode([4], 0), mode([5], 0), mode([4, 3], 0), mode([5, 4, 3], 0), mode([5, 4, 3], 2)] == [2, 2, 2, 1, 2]
    monkeypatch.setenv("EMBER_PDL_ALL", "0")
    assert [mode([4], 0), mode([5], 2), mode([4, 3], 2)] == [2, 1, 1]


@pytest.mark.parametrize("spec", [[(128, 4, 64)], [(192, 5, 64)], [(128, 3, 64), (64, 2, 64)],
                                  [(64, 6, 64), (128, 3, 32), (64, 8, 64)]], ids=["4", "5", "3+2", "6+3+8"])
@pytest.mark.parametrize("tiles", [1, 2])
def test_one_row_first_tile_before_wait(spec, tiles, monkeypatch):
    """PDL mode 2's path (tile 0 loaded before the wait, then the loop from tile 1), which the GPU takes for
    every matrix: forced on here, where the PDL instructions are no-ops (pdl.ON_GPU). One- and two-plane
    widths, mixed widths, asymmetric zeros and a permutation; one and two tiles a split."""
    from ember.kernels import pdl

    monkeypatch.setattr(pdl, "launch_kwargs", lambda device: {"PDL": 2})
    qt = make_qt(spec, 96, asym=len(spec) > 2, use_perm=len(spec) > 2, seed=tiles)
    x = torch.randn(1, qt.in_features, device=DEV).half()
    ref = x.float() @ dequantize(qt).to(DEV).T
    out = qmatmul(x, qt, plan=make_plan(qt, tiles))
    assert ((out.float() - ref).norm() / ref.norm()) < TOL


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("tiles", [1, 2, 3])
def test_uniform_splits_equal_the_metadata_table(bits, tiles, monkeypatch):
    """One-segment matrices compute each split's metadata row in the kernel (qmatmul_kernels._split_fields)
    instead of reading it: the same sums in the same order as the table, so bit-identical outputs, every width
    (two-plane ones included: the second plane's rows), one row and the tl.dot rows (forced: the plan gives it
    to one-row launches only), a last split shorter than the others (3 tiles a split over 5), groups of 32,
    asymmetric zeros. EMBER_UNIFORM=0 gives the table path, as do 3-bit matrices (measured faster with it)."""
    qt = make_qt([(320, bits, 32 if bits in (3, 6) else 64)], 48, asym=bits in (2, 5), seed=bits + tiles)
    x = torch.randn(5, qt.in_features, device=DEV).half()
    outs = {}
    for on in ("1", "0"):
        monkeypatch.setenv("EMBER_UNIFORM", on)
        plan = make_plan(qt, tiles)
        assert (plan.modes["gemv"].uniform is not None) == (on == "1" and bits != 3)  # 3 bits: the table
        assert plan.modes["small"].uniform is None
        if on == "1":  # the kernel's UNIFORM path on the tl.dot rows too
            plan.modes["small"].uniform = (tiles, 5, qt.segments[0, 3].item(), bits)
        outs[on] = [qmatmul(x[:m], qt, plan=plan) for m in (1, 5)]
    for a, b in zip(outs["1"], outs["0"]):
        assert torch.equal(a, b)
    ref = x.float() @ dequantize(qt).to(DEV).T
    assert ((outs["1"][1].float() - ref).norm() / ref.norm()) < TOL
    assert make_plan(make_qt(MIXED[:2], 16), tiles).modes["gemv"].uniform is None  # two segments: the table
