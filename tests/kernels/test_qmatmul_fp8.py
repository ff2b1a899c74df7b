"""The FP8 many-row path (kernels/qmatmul_fp8.py) against its references (kernels/reference.py).

The two Triton kernels must match the references bit for bit (codes q - z; activations rounded to e4m3 per
128 inputs, with their scales). The product then differs from the reference only by the fp16/bf16 output
rounding (the block-scaled GEMM is cuBLAS on the GPU, an fp32 emulation under TRITON_INTERPRET=1 on CPU),
and from the exact product x @ W.T by the activation rounding (~2-3%)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ember.kernels import reference as R
from ember.kernels.qmatmul import make_plan, qmatmul
from ember.kernels.qmatmul_fp8 import M_ALIGN, fp8_codes, fp8_reason, quantize_act
from ember.quant.format import centered_codes, dequantize
from tests.kernels.test_qmatmul import DEV, gpu, make_qt

ELIGIBLE = [(256, 4, 128), (128, 2, 128), (256, 3, 256), (128, 4, 128)]


@pytest.mark.parametrize("asym", [False, True])
def test_codes_match_reference(asym):
    """Every width the path takes (2-4 bits; 5 bits when symmetric), zeros, a permutation, a ragged last
    column block (N = 208, blocks of 64): exactly q - z in permuted input order, as e4m3."""
    spec = ELIGIBLE + ([] if asym else [(128, 5, 128)])
    qt = make_qt(spec, 208, asym=asym, use_perm=True, seed=3)
    assert fp8_reason(qt) is None
    plan = make_plan(qt, fp8=True)
    w8 = fp8_codes(qt, plan.fp8)
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == (qt.out_features, qt.in_features)
    assert torch.equal(w8.float(), centered_codes(qt))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,use_perm", [(37, True), (64, False)])
def test_activation_rounding_matches_reference(M, use_perm, dtype):
    """Scales and e4m3 codes equal the reference's, including an all-zero block, an outlier, tiny values
    (e4m3 subnormals) and values that round up into the next power of two; rows past M (cuBLAS padding)
    are zero with scale 1."""
    K = 384
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g) * 3
    x[0, :128] = 0  # an all-zero block (of the unpermuted input; with perm it spreads over blocks)
    x[1, 5] = 900.0  # an outlier: the rest of its block lands in e4m3's subnormal range
    x[2, :] = torch.linspace(120, 128, K)  # around 127.x -> 128 after scaling
    x = x.to(dtype).to(DEV)
    perm = torch.randperm(K, generator=g).to(torch.int32).to(DEV) if use_perm else None
    a8, sa = quantize_act(x, perm)
    mp = -(-M // M_ALIGN) * M_ALIGN
    assert a8.shape == (mp, K) and sa.shape == (K // 128, mp)
    ra, rs = R.fp8_quantize_act(x, perm)
    assert torch.equal(sa[:, :M], rs)
    assert torch.equal(a8[:M].float(), ra.float())
    assert not a8[M:].float().any() and (sa[:, M:] == 1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_perm", [False, True])
def test_silu_rounding_matches_reference(use_perm, dtype):
    """silu=True: the down projection's input, silu(gate) * up cast to the activation dtype, then rounded as
    above, from the gate/up output (M, 2I) in one kernel."""
    M, inter = 21, 256
    g = torch.Generator().manual_seed(11)
    gu = (torch.randn(M, 2 * inter, generator=g) * 4).to(dtype).to(DEV)
    perm = torch.randperm(inter, generator=g).to(torch.int32).to(DEV) if use_perm else None
    a8, sa = quantize_act(gu, perm, silu=True)
    assert a8.shape == (32, inter) and sa.shape == (2, 32)
    ra, rs = R.fp8_quantize_act(R.silu_and_mul(gu), perm)
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        # the interpreter's fp32 -> bf16 cast truncates where torch rounds: within a bf16 step, then an e4m3 one
        got, want = a8[:M].float() * sa[:, :M].T.repeat_interleave(128, 1), ra.float() * rs.T.repeat_interleave(128, 1)
        assert ((sa[:, :M] - rs).abs() <= rs * 2.0 ** -7).all()
        assert ((got - want).abs() <= want.abs() * 2.0 ** -3 + rs.max() * 2.0 ** -8).all()
        return
    assert torch.equal(sa[:, :M], rs)
    assert torch.equal(a8[:M].float(), ra.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_qmatmul_fp8_matches_reference(dtype):
    """Through qmatmul: more rows than the kernel paths take (70 > 64, not a multiple of 16), a Hadamard
    rotation, a permutation, zero points and a bias."""
    qt = make_qt(ELIGIBLE, 48, asym=True, use_perm=True, had=64, bias=True, seed=7)
    x = torch.randn(70, qt.in_features, device=DEV).to(dtype)
    out = torch.full((70, 48), float("nan"), dtype=dtype, device=DEV)
    plan = make_plan(qt, fp8=True)
    assert plan.fp8 is not None
    res = qmatmul(x, qt, out=out, plan=plan)
    assert res is out and torch.isfinite(out).all()
    ref = R.qmatmul_fp8(x, qt)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), err
    exact = x.float() @ dequantize(qt).to(DEV).T + qt.bias.float()
    err_exact = ((out.float() - exact).norm() / exact.norm()).item()
    assert 1e-3 < err_exact < 0.05, err_exact  # the e4m3 rounding shows, and stays small


def test_ineligible_matrices_keep_the_16_bit_path():
    assert "6-bit" in fp8_reason(make_qt([(128, 6, 128)], 32))
    assert "5-bit" in fp8_reason(make_qt([(128, 5, 128)], 32, asym=True))
    assert fp8_reason(make_qt([(128, 5, 128)], 32)) is None  # symmetric 5 bits: |q - 16| <= 16
    assert "aligned" in fp8_reason(make_qt([(128, 4, 64)], 32))  # groups of 64
    assert "aligned" in fp8_reason(make_qt([(64, 4, 64), (128, 4, 128)], 32))  # a 64-input segment
    assert "multiple of 16" in fp8_reason(make_qt([(128, 4, 128)], 40))
    qt = make_qt([(128, 6, 128)], 32)
    assert make_plan(qt, fp8=True).fp8 is None


def test_fp8_prefill_on_cpu_warns_and_changes_nothing(caplog):
    from torch import nn

    from ember.llm import enable_fp8_prefill

    model = nn.Sequential()
    with caplog.at_level("WARNING", logger="ember"):
        enable_fp8_prefill(model, torch.device("cpu"))
    assert "needs a Hopper GPU" in caplog.text


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [65, 200, 512])
def test_qmatmul_fp8_larger_shapes_on_cuda(M, dtype):
    """cuBLAS's block-scaled GEMM against the reference on larger shapes (skipped where the GPU can't)."""
    from ember.kernels.qmatmul_fp8 import fp8_device_ok

    if not fp8_device_ok(torch.device("cuda")):
        pytest.skip("block-scaled fp8 needs sm_90 and CUDA 12.9+")
    qt = make_qt([(512, 4, 128), (256, 3, 128), (256, 2, 256)], 768, asym=M == 200, use_perm=M != 65, seed=M)
    x = torch.randn(M, qt.in_features, device=DEV).to(dtype)
    plan = make_plan(qt, fp8=True)
    assert torch.equal(fp8_codes(qt, plan.fp8).float(), centered_codes(qt))
    out = qmatmul(x, qt, plan=plan)
    ref = R.qmatmul_fp8(x, qt)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), err
    a8, sa = quantize_act(x, qt.perm)
    ra, rs = R.fp8_quantize_act(x, qt.perm)
    assert torch.equal(sa[:, :M], rs) and torch.equal(a8[:M].float(), ra.float())
