"""GPTQ (ember/quant/gptq.py) against independent references: the Hessian-weighted error recomputed in
float64 from the packed tensor, round-to-nearest as the baseline it must beat, a plain column-by-column
OBS reference (inverse Hessian downdated after every column, no Cholesky, no blocks) in float64, and bit
counts taken from the packed tensors' sizes."""
import pytest
import torch

from ember.quant import gptq as gptq_mod
from ember.quant.candidates import CANDIDATES, head_candidates
from ember.quant.format import dequantize, make_segments, pack
from ember.quant.gptq import DAMP, QuantSpec, _blocks, _fit_group, gptq_quantize
from ember.quant.hadamard import block_hadamard
from ember.quant.rtn import rtn_quantize


def correlated_problem(N=96, K=256, T=3000, seed=0):
    """W (N, K) and H = X^T X of inputs with strongly correlated, unevenly scaled features."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) * 0.2 + torch.eye(K)
    X = (torch.randn(T, K, generator=g) @ mix) * (torch.rand(K, generator=g) * 4 + 0.1)
    W = torch.randn(N, K, generator=g) * 0.05
    return W, X.T.double() @ X.double()


def hessian_error(W, Wq, H) -> float:
    """tr((W - Wq) H (W - Wq)^T) / tr(W H W^T) in float64."""
    D = (W.double() - Wq.double())
    W = W.double()
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum())


SPECS = [QuantSpec(((256, 4, 128),)), QuantSpec(((256, 3, 64),), asym=True), QuantSpec(((256, 2, 32),), had=128),
         QuantSpec(((128, 6, 64), (128, 3, 32)), had=64), QuantSpec(((64, 8, 64), (128, 4, 128), (64, 2, 32)))]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_gptq_beats_rtn_and_reports_its_true_error(spec):
    W, H = correlated_problem()
    r = gptq_quantize(W, H.float(), [spec], want_codes=True)[0]
    true = hessian_error(W, dequantize(r.qt, torch.float64), H)
    assert r.rel_error == pytest.approx(true, rel=1e-3)
    rtn = rtn_quantize(W, list(spec.segments), sym=not spec.asym, had=spec.had)
    rtn_err = hessian_error(W, dequantize(rtn, torch.float64), H)
    assert true < 0.7 * rtn_err, (true, rtn_err)
    assert r.qt.stored_bits() == spec.stored_bits(W.shape[0])


def test_batched_specs_equal_one_at_a_time():
    W, H = correlated_problem(seed=1)
    specs = [QuantSpec(((256, b, g),), had=128, asym=a) for b, g, a in ((2, 64, False), (4, 32, True), (8, 128, False))]
    together = gptq_quantize(W, H.float(), specs)
    for spec, r in zip(specs, together):
        alone = gptq_quantize(W, H.float(), [spec])[0]
        assert r.error == pytest.approx(alone.error, rel=1e-4)


def obs_reference(W, H, spec):
    """Column-by-column GPTQ/OBS in float64: act-order, damping, quantize column j, spread its error with
    the current inverse Hessian, then remove j from the inverse (Schur complement). Group scales are fit
    (with the same clipping search) when a group's first column comes up."""
    K = W.shape[1]
    Wr = block_hadamard(W.double(), spec.had)
    Hr = H.double()
    if spec.had:
        Hr = block_hadamard(block_hadamard(Hr, spec.had).T, spec.had)
    perm = torch.argsort(Hr.diagonal().float(), descending=True, stable=True)
    Wp, Hp = Wr[:, perm].clone(), Hr[perm][:, perm]
    Hinv = torch.linalg.inv(Hp + DAMP * Hp.diagonal().mean() * torch.eye(K, dtype=torch.float64))
    out = torch.empty_like(Wp)
    k0 = 0
    for k_len, bits, g in spec.segments:
        for j in range(k0, k0 + k_len):
            if (j - k0) % g == 0:
                s, z = _fit_group(Wp[None, :, j:j + g].float(), Hp.diagonal()[j:j + g].float(), [bits], spec.asym)
                s, z = s[0].double(), z[0].double()
            q = torch.clamp(torch.round(Wp[:, j] / s + z), 0, (1 << bits) - 1)
            out[:, j] = (q - z) * s
            err = (Wp[:, j] - out[:, j]) / Hinv[j, j]
            Wp[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
            Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
        k0 += k_len
    Wq = torch.empty_like(out)
    Wq[:, perm] = out
    return block_hadamard(Wq, spec.had)


@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: s.describe())
def test_blocked_cholesky_gptq_matches_plain_obs(spec):
    W, H = correlated_problem(N=24, seed=2)
    ours = dequantize(gptq_quantize(W, H.float(), [spec], want_codes=True)[0].qt, torch.float64)
    ref = obs_reference(W, H, spec)
    e_ours, e_ref = hessian_error(W, ours, H), hessian_error(W, ref, H)
    assert e_ours == pytest.approx(e_ref, rel=0.05), (e_ours, e_ref)
    close = (ours - ref).abs() <= 1e-3 * W.abs().max()
    assert close.float().mean() > 0.95, f"first mismatch at {(~close).nonzero()[0].tolist()}"


@pytest.mark.parametrize("K", [128, 192, 576, 1536, 4096, 14336])
def test_candidate_specs_are_valid_and_counted_exactly(K):
    """Every candidate gives format-valid segments covering K, and QuantSpec.stored_bits equals the bits of
    the tensors pack() builds (checked by packing zeros of the right shapes for small K)."""
    N = 64
    for cand in CANDIDATES + head_candidates(6):
        spec = cand.spec(K)
        seg = make_segments(list(spec.segments))
        assert int(seg[:, 1].sum()) == K
        starts = seg[:, 0].tolist()  # large K: 128-aligned (shared GPTQ blocks), but a final 64-long piece
        if K >= 512:
            assert all(s % 128 == 0 for s in starts[:-1]), starts
            assert starts[-1] % 128 == 0 or (K % 128 == 64 and int(seg[-1, 1]) == 64), starts
        if spec.had:
            assert K % spec.had == 0
        if K <= 576:
            G = int((seg[:, 1] // seg[:, 3]).sum())
            qt = pack(torch.zeros(N, K, dtype=torch.int32), torch.ones(G, N).half(),
                      torch.zeros(G, N, dtype=torch.uint8) if spec.asym else None, list(spec.segments),
                      perm=torch.arange(K), had=spec.had)
            assert qt.stored_bits() == spec.stored_bits(N), cand.name


def test_mix_puts_the_widest_bits_on_the_most_important_inputs():
    """Act-order: a 8/2 mix's 8-bit segment holds the inputs with the largest Hessian diagonal."""
    W, H = correlated_problem(seed=3)
    spec = QuantSpec(((64, 8, 64), (192, 2, 64)))
    qt = gptq_quantize(W, H.float(), [spec], want_codes=True)[0].qt
    top = torch.argsort(H.diagonal(), descending=True)[:64]
    assert set(qt.perm[:64].tolist()) == set(top.tolist())


def _groups(spec):
    k = 0
    for k_len, _bits, g in spec.segments:
        yield from ((s, s + g) for s in range(k, k + k_len, g))
        k += k_len


@pytest.mark.parametrize("block", [16, 32, 128])
def test_blocks_never_split_a_group_that_starts_inside(block):
    """Every scale group starts a block or lies inside one (its scale is fit from fully updated columns)."""
    K = 64 * 13
    specs = [c.spec(K) for c in CANDIDATES] + [QuantSpec(((256, 4, 32), (512, 3, 128), (64, 8, 64)))]
    blocks = _blocks(specs, K, block)
    assert blocks[0][0] == 0 and blocks[-1][1] == K
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(0 < i2 - i1 <= block for i1, i2 in blocks)
    starts = {i1 for i1, _ in blocks}
    for spec in specs:
        for s, e in _groups(spec):
            inside = any(i1 <= s and e <= i2 for i1, i2 in blocks)
            assert s in starts or inside, (s, e)


def test_cpu_block_length_changes_nothing_but_rounding(monkeypatch):
    g = torch.Generator().manual_seed(3)
    K = 640
    W = torch.randn(48, K, generator=g)
    X = torch.randn(2048, K, generator=g) * torch.rand(K, generator=g) * 3
    H = X.T @ X
    specs = [c.spec(K) for c in CANDIDATES[:6]]
    res = {}
    for blk in (128, 32):
        monkeypatch.setattr(gptq_mod, "BLOCK_CPU", blk)
        res[blk] = gptq_quantize(W, H, specs)
    for a, b in zip(res[128], res[32]):
        assert abs(a.rel_error - b.rel_error) <= 1e-3 * a.rel_error
