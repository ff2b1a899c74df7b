"""Triton norm / activation / rope / KV-store kernels against the PyTorch references in
ember.kernels.reference, over odd shapes and dtypes. Without CUDA the kernels run in Triton's CPU
interpreter (switched on for this module only); the larger shapes are @gpu."""

import pytest
import torch

from ember.kernels import ops
from ember.kernels import reference as ref

# ~1-2 ulp: the interpreter truncates to bf16 where the GPU rounds
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
from tests.kernels.common import CANNOT_INTERPRET, DTYPES, assert_close, needs_cuda  # noqa: F401


def poison(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h", [(1, 50), (7, 96), (33, 50)])
def test_rms_norm(device, dtype, t, h):
    from ember.kernels import norm
    g = torch.Generator().manual_seed(t * h)
    x = torch.randn(t, h, generator=g).to(device, dtype)
    res = torch.randn(t, h, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(h, generator=g)).to(device, dtype)
    out = norm.rms_norm(x, w, 1e-6, out=poison((t, h), dtype, device))
    assert_close(out, ref.rms_norm(x, w, 1e-6), TOL[dtype], "rms_norm")
    normed, new_res = norm.add_rms_norm(x, res, w, 1e-5, out=poison((t, h), dtype, device),
                                        residual_out=poison((t, h), dtype, device))
    want_normed, want_res = ref.add_rms_norm(x, res, w, 1e-5)
    # One rounding of the same sum: exact, except that the interpreter truncates to bf16 instead of rounding.
    exact = device.type == "cuda" or dtype != torch.bfloat16
    assert_close(new_res, want_res, 0.0 if exact else TOL[dtype], "add_rms_norm residual")
    assert_close(normed, want_normed, TOL[dtype], "add_rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,inter", [(1, 37), (7, 64), (33, 2100)])
def test_silu_and_mul(device, dtype, t, inter):
    from ember.kernels import activation
    x = (3 * torch.randn(t, 2 * inter, generator=torch.Generator().manual_seed(t))).to(device, dtype)
    out = activation.silu_and_mul(x, out=poison((t, inter), dtype, device))
    assert_close(out, ref.silu_and_mul(x), TOL[dtype], "silu_and_mul")


def _qkv(t, hq, hk, d, dtype, device, seed):
    # q, k, v as the strided views the fused QKV projection produces: (T, H, D) slices of (T, (Hq+2Hk) D)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    return q.view(t, hq, d), k.view(t, hk, d), v.view(t, hk, d)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("hq,hk,d", [(4, 4, 64), (6, 2, 128), (8, 1, 64)])
def test_rope(device, dtype, t, hq, hk, d):
    from ember.kernels import rope
    q, k, _ = _qkv(t, hq, hk, d, dtype, device, seed=t + hq)
    cos_sin = ref.rope_cos_sin(d, 4096, 500000.0).to(device)
    pos = torch.randint(0, 4096, (t,), generator=torch.Generator().manual_seed(t)).to(device)
    q_in, k_in = q.clone(), k.clone()
    got = rope.rope(q, k, pos, cos_sin, q_out=poison(q.shape, dtype, device),
                    k_out=poison(k.shape, dtype, device))
    want = ref.rope(q, k, pos, cos_sin)
    assert_close(got[0], want[0], TOL[dtype], "rope q")
    assert_close(got[1], want[1], TOL[dtype], "rope k")
    assert torch.equal(q, q_in) and torch.equal(k, k_in), "rope must not write its inputs"


def _caches(hk, d, page, dtype, device, pages=6):
    # NaN everywhere: slots the op should not write must stay NaN, as in the reference's copy.
    kc = poison((pages, hk, page, d), dtype, device)
    return kc, kc.clone(), kc.clone(), kc.clone()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("t,hk,d", [(1, 1, 64), (7, 3, 128), (33, 8, 64)])
def test_store_kv(device, dtype, page, t, hk, d):
    from ember.kernels import attention
    _, k, v = _qkv(t, 2, hk, d, dtype, device, seed=t)
    slots = torch.randperm(6 * page, generator=torch.Generator().manual_seed(page))[:t]
    slots[t // 2] = -1  # a padding token: skipped
    slots = slots.to(device)
    kc, vc, kc_ref, vc_ref = _caches(hk, d, page, dtype, device)
    attention.store_kv(k, v, kc, vc, slots)
    ref.store_kv(k, v, kc_ref, vc_ref, slots)
    assert_close(kc, kc_ref, 0.0, "k_cache")
    assert_close(vc, vc_ref, 0.0, "v_cache")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,hq,hk,d,page", [(1, 4, 4, 64, 16), (7, 6, 2, 128, 64), (33, 8, 1, 64, 16)])
def test_rope_store_kv(device, dtype, t, hq, hk, d, page):
    from ember.kernels import rope
    q, k, v = _qkv(t, hq, hk, d, dtype, device, seed=t * 3)
    cos_sin = ref.rope_cos_sin(d, 512, 10000.0).to(device)
    pos = torch.randint(0, 512, (t,), generator=torch.Generator().manual_seed(t)).to(device)
    slots = torch.randperm(6 * page, generator=torch.Generator().manual_seed(t))[:t]
    slots[-1] = -1
    slots = slots.to(device)
    kc, vc, kc_ref, vc_ref = _caches(hk, d, page, dtype, device)
    got_q, got_k = rope.rope_store_kv(q, k, v, pos, cos_sin, kc, vc, slots)
    want_q, want_k = ref.rope_store_kv(q, k, v, pos, cos_sin, kc_ref, vc_ref, slots)
    assert_close(got_q, want_q, TOL[dtype], "q")
    assert_close(got_k, want_k, TOL[dtype], "k")
    assert_close(kc, kc_ref, TOL[dtype], "k_cache")
    assert_close(vc, vc_ref, 0.0, "v_cache")


def test_ops_dispatch(device, monkeypatch):
    """ops runs the Triton kernel where it should (CUDA, or CPU under the interpreter) and the reference
    with EMBER_NO_TRITON=1."""
    from ember.kernels import norm
    calls = []
    monkeypatch.setattr(norm, "rms_norm", lambda *a: calls.append(1) or ref.rms_norm(*a))
    x, w = torch.randn(3, 8, device=device), torch.ones(8, device=device)
    ops.rms_norm(x, w, 1e-6)
    assert calls == [1]
    monkeypatch.setenv("EMBER_NO_TRITON", "1")
    ops.rms_norm(x, w, 1e-6)
    assert calls == [1]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_shapes_gpu(device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8192, generator=g).to(device, dtype)
    w = torch.randn(8192, generator=g).to(device, dtype)
    assert_close(ops.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), TOL[dtype], "rms_norm")
    for got, want in zip(ops.add_rms_norm(x, x.flip(0), w, 1e-5), ref.add_rms_norm(x, x.flip(0), w, 1e-5)):
        assert_close(got, want, TOL[dtype], "add_rms_norm")
    y = torch.randn(300, 2 * 14336, generator=g).to(device, dtype)
    assert_close(ops.silu_and_mul(y), ref.silu_and_mul(y), TOL[dtype], "silu_and_mul")
    q, k, v = _qkv(513, 32, 8, 128, dtype, device, seed=1)
    cos_sin = ref.rope_cos_sin(128, 8192, 500000.0).to(device)
    pos = torch.arange(513, device=device) + 7000
    kc, vc, kc_ref, vc_ref = _caches(8, 128, 64, dtype, device, pages=130)
    slots = torch.randperm(130 * 64, device=device)[:513]
    for got, want in zip(ops.rope_store_kv(q, k, v, pos, cos_sin, kc, vc, slots) + (kc, vc),
                         ref.rope_store_kv(q, k, v, pos, cos_sin, kc_ref, vc_ref, slots) + (kc_ref, vc_ref)):
        assert_close(got, want, TOL[dtype], "rope_store_kv")
