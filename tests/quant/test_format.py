"""The quantized format (ember/quant/format.py) against the rules of docs/format.md, written out here
independently: bit positions, the layer math in float64, bit counts from tensor sizes, strict loading."""
import dataclasses
import itertools
import json

import pytest
import torch

from ember.errors import WeightsError
from ember.layers.quant_linear import QuantLinear
from ember.quant.format import (
    FORMAT_VERSION,
    PLANES,
    PLANES_V1,
    QuantizedTensor,
    _pack_plane,
    dequantize,
    pack,
    read_manifest,
    unpack_codes,
    upgrade,
    write_manifest,
)
from ember.quant.hadamard import block_hadamard, hadamard_matrix
from ember.quant.rtn import rtn_quantize

WIDTHS = [2, 3, 4, 5, 6, 8]
MIXED = [(128, 5, 64), (64, 4, 32), (192, 3, 64), (128, 8, 128), (64, 2, 64), (128, 6, 128)]


def random_parts(spec, N, asym, seed=0):
    """Codes (N, K), scales (G, N), zeros (G, N) | None for a segment spec."""
    gen = torch.Generator().manual_seed(seed)
    codes, G = [], 0
    for k_len, b, g in spec:
        codes.append(torch.randint(0, 1 << b, (N, k_len), generator=gen))
        G += k_len // g
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 256, (G, N), generator=gen).to(torch.uint8) if asym else None
    return torch.cat(codes, 1), scales, zeros


def reference_weight(spec, codes, scales, zeros):
    """float64 (N, K) permuted-rotated weight straight from the doc: (q - z[g(k)]) * s[g(k)]."""
    cols, row = [], 0
    k0 = 0
    for k_len, b, g in spec:
        for k in range(k0, k0 + k_len, g):
            s = scales[row].double()[:, None]
            z = zeros[row].double()[:, None] if zeros is not None else 2.0 ** (b - 1)
            cols.append((codes[:, k:k + g].double() - z) * s)
            row += 1
        k0 += k_len
    return torch.cat(cols, 1)


@pytest.mark.parametrize("spec", [[(192, b, 64)] for b in WIDTHS] + [MIXED], ids=lambda s: str(s[0][1])
                         if len(s) == 1 else "mixed")
def test_pack_unpack_round_trip_and_bit_positions(spec):
    N = 40
    codes, scales, zeros = random_parts(spec, N, asym=False)
    qt = pack(codes, scales, zeros, spec)
    assert torch.equal(unpack_codes(qt), codes.to(torch.int32))
    # Bit positions by the doc's rule: field j (bits j*p..) of the 16-bit half h of row t of block B of a plane
    # of width p (r = 2p rows a block) holds input B*64 + 32h + j*r + t; the 3-bit plane's last two inputs of
    # each half (30 + t, 62 + t) keep bit u in bit 15 of half h of row 2u + t.
    words = qt.qweight.to(torch.int64) & 0xFFFFFFFF
    qrow, k0 = 0, 0
    for k_len, b, _g in spec:
        shift = 0
        for p in PLANES[b]:
            r = 2 * p
            for k in [*range(0, k_len, 7), 30, 31, 62, 63]:  # a sample of inputs, every column
                B, h, q = k // 64, (k % 64) // 32, k % 32
                if q < 32 // r * r:
                    got = (words[qrow + B * r + q % r] >> (16 * h + q // r * p)) & ((1 << p) - 1)
                else:
                    assert p == 3 and q in (30, 31)
                    got = sum(((words[qrow + B * r + 2 * u + q - 30] >> (16 * h + 15)) & 1) << u for u in range(3))
                want = (codes[:, k0 + k] >> shift) & ((1 << p) - 1)
                assert torch.equal(got, want), f"width {b} plane {p} input {k}"
            qrow += k_len * p // 32
            shift += p
        k0 += k_len
    assert qrow == qt.qweight.shape[0]


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("had", [0, 64])
@pytest.mark.parametrize("use_perm", [False, True])
def test_layer_matches_float64_math(asym, had, use_perm):
    N, K = 24, sum(s[0] for s in MIXED)
    codes, scales, zeros = random_parts(MIXED, N, asym, seed=1)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(2)) if use_perm else None
    qt = pack(codes, scales, zeros, MIXED, perm=perm, had=had)
    x = torch.randn(5, K, dtype=torch.float64)
    # The doc's math: rotate x, permute x, multiply by Wq (permuted order).
    xr = block_hadamard(x, had) if had else x
    xr = xr[:, perm] if perm is not None else xr
    ref = xr @ reference_weight(MIXED, codes, scales, zeros).T
    out = QuantLinear(qt)(x.float()).double()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel  # float32 layer vs float64 math
    w = dequantize(qt, torch.float64)
    assert torch.allclose(x @ w.T, ref, rtol=1e-9, atol=1e-9)


def test_stored_bits_hand_count():
    N = 48
    codes, scales, zeros = random_parts(MIXED, N, asym=True)
    K = sum(s[0] for s in MIXED)
    qt = pack(codes, scales, zeros, MIXED, perm=torch.randperm(K), had=64)
    rows = sum(k_len * b // 32 for k_len, b, _ in MIXED)
    groups = sum(k_len // g for k_len, _, g in MIXED)
    nbytes = rows * N * 4 + groups * N * 2 + groups * N * 1 + K * 4 + len(MIXED) * 6 * 4 + 4
    assert qt.stored_bits() == nbytes * 8
    assert qt.bpw() == pytest.approx(nbytes * 8 / (N * K))
    sym = pack(codes, scales, None, MIXED)
    assert sym.stored_bits() == (rows * N * 4 + groups * N * 2 + len(MIXED) * 24) * 8


def test_state_dict_round_trip_and_strictness():
    codes, scales, zeros = random_parts(MIXED, 16, asym=True)
    K = codes.shape[1]
    qt = pack(codes, scales, zeros, MIXED, perm=torch.randperm(K), had=32, bias=torch.randn(16).half())
    sd = qt.state_dict("model.layers.0.mlp.down_proj")
    back = QuantizedTensor.from_state_dict("model.layers.0.mlp.down_proj", sd)
    assert torch.equal(dequantize(back), dequantize(qt)) and back.had == 32
    for piece in ("qweight", "scales", "segments"):
        bad = {k: v for k, v in sd.items() if not k.endswith("." + piece)}
        with pytest.raises(WeightsError, match=piece):
            QuantizedTensor.from_state_dict("model.layers.0.mlp.down_proj", bad)
    for piece, t in (("scales", scales[:-1]), ("qzeros", zeros.int()), ("perm", torch.arange(K - 1))):
        bad = dict(sd, **{f"model.layers.0.mlp.down_proj.{piece}": t})
        with pytest.raises(WeightsError, match=piece):
            QuantizedTensor.from_state_dict("model.layers.0.mlp.down_proj", bad)
    with pytest.raises(WeightsError, match="g_idx"):
        QuantizedTensor.from_state_dict("p", {**qt.state_dict("p"), "p.g_idx": torch.zeros(3)})


def test_manifest_version(tmp_path):
    write_manifest(tmp_path, {"bpw": 4.0, "layers": {}})
    assert read_manifest(tmp_path)["version"] == FORMAT_VERSION
    (tmp_path / "ember_quant.json").write_text('{"format": "ember-quant", "version": 99}')
    with pytest.raises(WeightsError, match=r"99.*\(1, 2\)"):
        read_manifest(tmp_path)


def test_hadamard_is_orthonormal_and_involutive():
    H = hadamard_matrix(16, torch.float64)
    assert torch.allclose(H @ H, torch.eye(16, dtype=torch.float64))
    assert torch.allclose(hadamard_matrix(2, torch.float64) * 2 ** 0.5, torch.tensor([[1.0, 1], [1, -1]],
                                                                                      dtype=torch.float64))
    x = torch.randn(3, 128, dtype=torch.float64)
    assert torch.allclose(block_hadamard(block_hadamard(x, 32), 32), x)


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_decreases_with_bits(sym):
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    errs = []
    for b in WIDTHS:
        qt = rtn_quantize(W, b, group_size=64, sym=sym)
        errs.append(((dequantize(qt) - W).norm() / W.norm()).item())
    assert all(a > b for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 0.01
    mixed = rtn_quantize(W, [(128, 5, 64), (128, 3, 32)], sym=sym, had=64)
    e_mixed = ((dequantize(mixed) - W).norm() / W.norm()).item()
    assert errs[WIDTHS.index(5)] < e_mixed < errs[WIDTHS.index(3)]


def test_version_1_three_bit_planes_are_repacked_on_load(tmp_path):
    """A version 1 file stored 3-bit codes as a 2-bit and a 1-bit plane: `upgrade` and the loader's ember hook
    turn them into the 3-bit plane (same rows), and leave the other widths and version 2 files alone."""
    from torch import nn

    from ember.layers.linear import Linear
    from ember.quant.load import ember_hook

    spec = [(128, 3, 64), (64, 4, 64), (64, 3, 32)]
    codes, scales, zeros = random_parts(spec, 24, asym=True)
    qt = pack(codes, scales, zeros, spec)
    old = torch.cat([_pack_plane(codes[:, :128] & 3, 2), _pack_plane(codes[:, :128] >> 2, 1),
                     _pack_plane(codes[:, 128:192], 4),
                     _pack_plane(codes[:, 192:] & 3, 2), _pack_plane(codes[:, 192:] >> 2, 1)])
    v1 = dataclasses.replace(qt, qweight=old)
    assert torch.equal(unpack_codes(v1, PLANES_V1), codes.to(torch.int32))
    assert not torch.equal(old, qt.qweight)
    assert torch.equal(upgrade(v1, 1).qweight, qt.qweight) and upgrade(qt, FORMAT_VERSION) is qt
    assert torch.equal(upgrade(v1, 1, chunk=7).qweight, qt.qweight)  # column chunks that do not divide N

    class Folder:  # the tensor store of an ember folder, as the loader passes it to the hook
        folder = tmp_path

        def __init__(self, tensors):
            self.tensors = tensors

        def names(self):
            return list(self.tensors)

        def get(self, k):
            return self.tensors[k]

    model = nn.Module()
    model.proj = Linear(256, 24, bias=False)
    for version, tensors in ((1, v1.state_dict("proj")), (2, qt.state_dict("proj"))):
        write_manifest(tmp_path, {})
        data = json.loads((tmp_path / "ember_quant.json").read_text())
        (tmp_path / "ember_quant.json").write_text(json.dumps(dict(data, version=version)))
        ember_hook(model, Folder(tensors), "cpu")
        assert torch.equal(model.proj.qt.qweight, qt.qweight), version
        model.proj = Linear(256, 24, bias=False)
