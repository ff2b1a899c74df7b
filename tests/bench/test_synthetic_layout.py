"""The synthetic models `ember bench --synthetic` builds: the plain layout and the converter's act-order one
(--act-order: input permutation, zero points, Hadamard rotation) are valid quantized matrices."""
import torch

from ember.bench.synthetic import build_random, decoder_bpw, random_quantized, segment_spec
from ember.config import ModelConfig
from ember.layers.quant_linear import QuantLinear
from ember.quant.format import dequantize
from tests.models.tiny import BASE


def test_act_order_matrix_layout():
    gen = torch.Generator().manual_seed(0)
    spec = segment_spec(640, 4.5, 64)  # 5 + 4 bits
    qt = random_quantized(640, 48, spec, "cpu", gen, act_order=True)
    assert sorted(qt.perm.tolist()) == list(range(640)) and qt.had == 128 and qt.qzeros.dtype == torch.uint8
    g0 = spec[0][0] // spec[0][2]  # groups of the first (5-bit) segment
    assert qt.qzeros[:g0].max() < 32 and qt.qzeros[g0:].max() < 16 and qt.qzeros.shape == qt.scales.shape
    plain = random_quantized(640, 48, spec, "cpu", torch.Generator().manual_seed(0))
    assert plain.perm is None and plain.qzeros is None and plain.had == 0
    assert qt.stored_bits() > plain.stored_bits()  # zeros and the permutation are stored too
    w = dequantize(qt)  # (N, K) in the original input order
    assert w.shape == (48, 640) and torch.isfinite(w).all()
    ql = QuantLinear(qt)
    x = torch.randn(3, 640)
    assert torch.allclose(ql(x), x @ w.T, rtol=1e-4, atol=1e-5)


def test_act_order_model():
    cfg = ModelConfig.from_hf(dict(BASE, intermediate_size=128, architectures=["LlamaForCausalLM"], rope_theta=10000.0))
    model = build_random(cfg, 4.0, 8, torch.device("cpu"), torch.float32, 64, group=32, act_order=True)
    lins = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert lins and all(m.qt.perm is not None and m.qt.qzeros is not None and m.qt.had for m in lins)
    plain = build_random(cfg, 4.0, 8, torch.device("cpu"), torch.float32, 64, group=32)
    assert decoder_bpw(model) > decoder_bpw(plain) > 4.5  # 4 bits + an fp16 scale per 32 (+ tables); zeros, perm on top
