"""The fused dequantize-GEMM for many rows (kernels/qgemm.py) against x @ dequantize(qt).T in float32.

On CPU through TRITON_INTERPRET=1 (the plain-Triton decode, bit for bit the PTX's arithmetic; fp32 dot), tiny
tiles; on the GPU the PTX decode and wgmma over the tile configs the sweep tries, odd M and N."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must be set before the kernels are decorated (imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ember.kernels import qgemm
from ember.kernels.qmatmul import make_plan, qmatmul
from ember.quant.format import dequantize
from tests.kernels.test_qmatmul import DEV, gpu, make_qt


def rel_err(qt, M, dtype, config, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(M, qt.in_features, device=DEV).to(dtype)
    ref = x.float() @ dequantize(qt).to(DEV).T
    out = torch.full((M, qt.out_features), float("nan"), dtype=dtype, device=DEV)
    g = make_plan(qt).qgemm_g
    assert g, "the matrix should fit the fused kernel"
    qgemm.qgemm(x, qt, out, g, config)
    assert torch.isfinite(out).all(), "unwritten output"
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("g,asym", [(32, True), (64, False), (128, True)], ids=["g32z", "g64", "g128z"])
def test_qgemm_matches_reference(dtype, g, asym):
    qt = make_qt([(256, 4, g)], 80, asym=asym)  # N = 80: a partial 64-column block
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel_err(qt, 21, dtype, (64, 16, 4, 1)) < tol  # M = 21: a partial row block
    assert rel_err(make_qt([(256, 4, g)], 64, asym=asym), 32, dtype, (64, 16, 4, 1)) < tol  # whole tiles, no masks
    assert rel_err(make_qt([(192, 4, 64 if g == 128 else g)], 64, asym=asym), 32, dtype, (64, 16, 4, 1)) < tol  # K % 128 = 64: one block a step


@pytest.mark.parametrize("split,K", [(2, 256), (3, 384), (2, 192)], ids=["s2", "s3", "s2kb1"])
def test_qgemm_split_k(split, K):
    """Split-K: each split's fp32 partial, summed by the last program of a tile, equals the unsplit product up
    to fp32 summation order; partial tiles too; the tile counters are zero again afterwards (the next launch, or
    a graph replay, starts from zero). K = 192: one block a step, 3 steps cannot split in 2 -> runs unsplit."""
    qt = make_qt([(K, 4, 64)], 80, asym=True)
    whole = rel_err(qt, 21, torch.float16, (64, 16, 4, 1))
    split_err = rel_err(qt, 21, torch.float16, (64, 16, 4, 1, split))
    assert split_err < 2e-3 and abs(split_err - whole) < 5e-4
    assert int(qgemm.counters(torch.device(DEV)).abs().sum()) == 0
    # the same tile counters serve a second launch
    assert rel_err(qt, 32, torch.float16, (64, 16, 4, 1, split), seed=1) < 2e-3
    assert int(qgemm.counters(torch.device(DEV)).abs().sum()) == 0


def test_qgemm_tail_split(monkeypatch):
    """Whole tiles and split ones in one launch: 4 tiles on 3 slots run 3 whole, then the last split in two
    (split_plan), and the result matches the unsplit product."""
    qt = make_qt([(256, 4, 128)], 80, asym=False)
    whole = rel_err(qt, 21, torch.float16, (64, 16, 4, 1))
    monkeypatch.setattr(qgemm, "_slots", lambda *a: 3)
    launched = []
    real = qgemm.qgemm4_kernel
    monkeypatch.setattr(qgemm, "qgemm4_kernel", type("K", (), {"__getitem__": lambda self, grid: (
        launched.append(grid), real[grid])[1]})())
    assert abs(rel_err(qt, 21, torch.float16, (64, 16, 4, 1, 2)) - whole) < 5e-4
    assert launched == [(3 + 2,)]
    assert int(qgemm.counters(torch.device(DEV)).abs().sum()) == 0


@pytest.mark.parametrize("config", [(64, 16, 4, 1), (64, 16, 4, 1, 2)], ids=["whole", "split"])
@pytest.mark.parametrize("inter", [64, 40], ids=["even", "masked"])
def test_qgemm_glu(config, inter):
    """glu: W = [gate | up] (N = 2I), out (M, I) = silu(gate) * up of the rounded product, what qmatmul then
    the separate SiLU-and-multiply give; I = 40: a partial half-tile. Split tiles finish the same way."""
    from ember.kernels.reference import silu_and_mul

    qt = make_qt([(256, 4, 64)], 2 * inter, asym=True)
    x = torch.randn(21, 256, device=DEV).half()
    ref = silu_and_mul((x.float() @ dequantize(qt).to(DEV).T).half()).float()
    out = torch.full((21, inter), float("nan"), dtype=torch.float16, device=DEV)
    qgemm.qgemm(x, qt, out, make_plan(qt).qgemm_g, config, glu=True)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).norm() / ref.norm()) < 2e-3


def test_qmatmul_glu_epilogue_through_qgemm(monkeypatch):
    """qmatmul(epi=Epilogue(glu=True)) on many rows fuses the SiLU-and-multiply into qgemm's store (one launch,
    (M, I) out) when the fused kernel takes the rows; fuses_glu says so; EMBER_QGEMM_GLU=0 turns it off."""
    from ember.kernels.epilogue import Epilogue
    from ember.kernels.qmatmul import fuses_glu
    from ember.kernels.reference import silu_and_mul

    qt = make_qt([(128, 4, 64)], 64, asym=True)
    x = torch.randn(70, 128, device=DEV).half()
    plan = make_plan(qt)
    monkeypatch.setattr(qgemm, "use_for", lambda M, N, K: True)
    globs = []
    real = qgemm.qgemm
    monkeypatch.setattr(qgemm, "qgemm", lambda *a, **k: globs.append(k.get("glu")) or real(*a, **k))
    ref = silu_and_mul(qmatmul(x, qt, plan=plan)).float()
    assert fuses_glu(plan, qt, x)
    out = qmatmul(x, qt, plan=plan, epi=Epilogue(glu=True))
    assert out.shape == (70, 32) and globs == [False, True]
    assert ((out.float() - ref).norm() / ref.norm()) < 2e-3
    monkeypatch.setenv("EMBER_QGEMM_GLU", "0")
    assert not fuses_glu(plan, qt, x)


def test_split_plan():
    """The waves each choice takes, in whole-tile times: fewer only where splitting fills a partial wave."""
    assert qgemm.split_plan(64, 2, 132) == 0  # 1 -> 1/2: all split
    assert qgemm.split_plan(448, 2, 132) == 396  # 4 -> 3.5: the last 52 tiles split
    assert qgemm.split_plan(96, 2, 132) == 96  # 192 halves take as long as 96 wholes
    assert qgemm.split_plan(96, 4, 132) == 0  # 1 -> 3/4
    assert qgemm.split_plan(132, 2, 132) == 132  # one full wave


def test_qgemm_eligibility():
    """Only plain one-segment 4-bit matrices with N % 16 == 0 go through the fused kernel."""
    assert make_plan(make_qt([(128, 4, 64)], 32)).qgemm_g == 64
    assert make_plan(make_qt([(128, 4, 64)], 40)).qgemm_g == 0  # N % 16
    assert make_plan(make_qt([(128, 8, 64)], 32)).qgemm_g == 0  # width
    assert make_plan(make_qt([(64, 4, 64), (64, 3, 64)], 32)).qgemm_g == 0  # two segments
    assert make_plan(make_qt([(128, 4, 64)], 32, use_perm=True)).qgemm_g == 0  # act-order


def test_qmatmul_routes_many_rows_to_qgemm(monkeypatch):
    """qmatmul above DOT_MAX_ROWS rows takes the fused kernel ("auto"), and gives what dequantize + matmul gives;
    EMBER_QGEMM=0 and large_mode="dequant" keep the old path."""
    qt = make_qt([(128, 4, 64)], 32, asym=True)
    x = torch.randn(70, 128, device=DEV).half()
    ref = x.float() @ dequantize(qt).to(DEV).T
    calls = []
    real = qgemm.qgemm
    monkeypatch.setattr(qgemm, "qgemm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(qgemm, "use_for", lambda M, N, K: True)  # the rule itself: test_qgemm_rule
    out = qmatmul(x, qt, plan=make_plan(qt))
    assert calls == [1]
    assert ((out.float() - ref).norm() / ref.norm()) < 2e-3
    for env, mode in (("0", "auto"), ("1", "dequant")):
        monkeypatch.setenv("EMBER_QGEMM", env)
        out2 = qmatmul(x, qt, plan=make_plan(qt, large_mode=mode))
        assert calls == [1] and ((out2.float() - ref).norm() / ref.norm()) < 2e-3


def test_qgemm_rule():
    """The measured rule (qgemm.py): the wide gate/up up to 512 rows, qkv and o up to 256, down up to 512 (the
    narrow ones split along K); each pick a valid tile."""
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
    taken = {name: [M for M in (64, 65, 128, 192, 256, 384, 512, 513, 2048) if qgemm.use_for(M, N, K)]
             for name, (N, K) in shapes.items()}
    # whole tiles only (65 and 513 rows would need masks), and K % 128 == 0
    assert taken == {"qkv": [128, 256], "o": [128, 256], "gate_up": [128, 256, 512], "down": [128, 192, 256, 512]}
    assert not qgemm.use_for(256, 6144, 4096 + 64)
    for M in (65, 128, 192, 256, 512):
        for N, K in ((4096, 14336), (6144, 4096), (28672, 4096)):
            bn, bm, warps, stages, split = qgemm.pick_config(M, N, K)
            assert bn % (16 * warps) == 0 and bm in (64, 128, 256) and stages >= 3 and split >= 1


CONFIGS = [(64, 64, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (64, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 4),
           (256, 128, 16, 3), (128, 256, 8, 3, 2), (256, 128, 16, 3, 2), (128, 128, 8, 4, 3), (128, 256, 8, 3, 4)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_qgemm_configs(config, dtype):
    """Each tile config the sweep tries, M and N not multiples of the tile, symmetric g128 and g32 with zeros."""
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for spec, asym, M in (((1536, 4, 128), False, 333), ((1024, 4, 32), True, 130)):
        qt = make_qt([spec], 784, asym=asym)
        assert rel_err(qt, M, dtype, config) < tol, (spec, asym, M)


def test_mlp_asks_for_fused_glu(monkeypatch):
    """The MLP hands gate/up an Epilogue(glu=True) when the layer says it fuses it (QuantLinear.fuses_glu:
    prompts through qgemm on the GPU), and gets what the separate SiLU-and-multiply gives."""
    from torch import nn

    from ember.layers.mlp import MLP
    from ember.layers.quant_linear import QuantLinear

    mlp = MLP.__new__(MLP)
    nn.Module.__init__(mlp)
    mlp.gate_up_proj = QuantLinear(make_qt([(128, 4, 64)], 2 * 64, asym=True))
    mlp.down_proj = QuantLinear(make_qt([(64, 4, 64)], 128, seed=1))
    x = torch.randn(5, 128, device=DEV).half()
    ref = mlp(x)
    asked = []
    real = QuantLinear.forward
    monkeypatch.setattr(QuantLinear, "fuses_glu", lambda self, x: True)
    monkeypatch.setattr(QuantLinear, "forward", lambda self, x, epi=None: asked.append(epi) or real(self, x, epi))
    out = mlp(x)
    assert asked[0] is not None and asked[0].glu and asked[1] is None
    assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
@gpu
def test_gpu_qgemm_glu_gate_up_shape():
    """The 8B gate/up's routing at 512 rows (N = 2 x 14336: 448 tiles of 128 x 256, the last 52 split along K on
    an H100) with the SiLU-and-multiply in the store, against the plain product then the separate pass."""
    from ember.kernels.epilogue import Epilogue
    from ember.kernels.qmatmul import fuses_glu
    from ember.kernels.reference import silu_and_mul

    qt = make_qt([(1024, 4, 128)], 2 * 14336)
    x = torch.randn(512, 1024, device="cuda").half()
    plan = make_plan(qt)
    assert qgemm.use_for(512, 2 * 14336, 1024) and fuses_glu(plan, qt, x)
    ref = silu_and_mul(qmatmul(x, qt, plan=plan)).float()
    out = qmatmul(x, qt, plan=plan, epi=Epilogue(glu=True))
    assert out.shape == (512, 14336)
    assert ((out.float() - ref).norm() / ref.norm()) < 2e-3
