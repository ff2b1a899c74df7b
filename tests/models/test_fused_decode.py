"""The fused decode path of a quantized model (norms, residual adds and SiLU folded into the projections'
stores, kernels/epilogue.py) against the plain layer-by-layer path: same logits at every step, for one
sequence and for a batch. On CPU both run the PyTorch references, so this checks the wiring (which norm
weight and which mean square go where, the in-place residual); the kernels' epilogues are checked against
the same references in tests/kernels/test_qmatmul.py."""
import pytest
import torch

from ember.engine.kv_cache import KVCache
from ember.forward_batch import ForwardBatch
from ember.models.llama import DecoderLayer, LlamaModel
from tests.models.tiny import quantized_tiny

PAGE = 16
CFG = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=300, rope_theta=10000.0, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model():
    return quantized_tiny(CFG, "cpu", torch.float32, 256, group=32, scale_gain=40)


@pytest.fixture(scope="module")
def act_model():
    """The converter's layout: every store prepares its output for the next matrix (rotation, permutation)."""
    return quantized_tiny(CFG, "cpu", torch.float32, 256, group=32, scale_gain=40, act_order=True)


def run(model, monkeypatch, fused: bool, seqs, steps: int):
    """Prefill each prompt (plain path: more rows than a decode batch), then `steps` greedy decode steps of
    all sequences together; returns the decode logits (steps, B, V)."""
    monkeypatch.setattr(LlamaModel, "use_fused", lambda self, x: fused and x.shape[0] <= 32)
    kv = KVCache(model.config, 64, PAGE, torch.float32, "cpu")
    pages = [list(range(i * 8, i * 8 + 8)) for i in range(len(seqs))]
    last = []
    with torch.no_grad():
        for s, p in zip(seqs, pages):
            last.append(int(model(ForwardBatch.build([(s, 0, p)], PAGE, "cpu"), kv.layers()).argmax(-1)[0]))
        lens, out = [len(s) for s in seqs], []
        for _ in range(steps):
            batch = ForwardBatch.build([([t], n, p) for t, n, p in zip(last, lens, pages)], PAGE, "cpu")
            logits = model(batch, kv.layers())
            out.append(logits)
            last, lens = logits.argmax(-1).tolist(), [n + 1 for n in lens]
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["plain", "act_order"])
@pytest.mark.parametrize("n_seqs", [1, 3])
def test_fused_decode_matches_plain_path(model, act_model, monkeypatch, n_seqs, layout):
    if layout == "act_order":
        model = act_model
        assert model.model.layers[0].mlp.down_proj.perm is not None and model.model.layers[0].mlp.down_proj.had
    gen = torch.Generator().manual_seed(n_seqs)
    seqs = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (40, 33, 57)[:n_seqs]]
    calls = []
    real = DecoderLayer.forward_fused
    monkeypatch.setattr(DecoderLayer, "forward_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = run(model, monkeypatch, True, seqs, 4)
    assert len(calls) == 4 * 3, "the fused path was not taken"
    plain = run(model, monkeypatch, False, seqs, 4)
    assert len(calls) == 4 * 3
    err = ((fused - plain).norm() / plain.norm()).item()
    assert err < 1e-4, f"fused decode logits differ from the plain path: rel err {err:.2e}"
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))


def test_fused_path_needs_every_projection_quantized(model):
    model.model._fusable = None
    assert model.model.fusable()
    layer = model.model.layers[1]
    saved = layer.mlp.down_proj
    try:
        layer.mlp.down_proj = torch.nn.Linear(saved.in_features, saved.out_features, bias=False)
        model.model._fusable = None
        assert not model.model.fusable()
    finally:
        layer.mlp.down_proj = saved
        model.model._fusable = None


def test_fused_short_prefill_matches_plain_path(model, monkeypatch):
    """Prompts of up to 32 tokens also take the fused layer (prefill attention, fused matmul epilogues)."""
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (20, 9)]
    pages = [list(range(0, 4)), list(range(4, 8))]
    batch = ForwardBatch.build([(s, 0, p) for s, p in zip(seqs, pages)], PAGE, "cpu", need_all_logits=True)
    out = {}
    for fused in (True, False):
        monkeypatch.setattr(LlamaModel, "use_fused", lambda self, x, f=fused: f)
        kv = KVCache(model.config, 16, PAGE, torch.float32, "cpu")
        with torch.no_grad():
            out[fused] = model(batch, kv.layers())
    err = ((out[True] - out[False]).norm() / out[False].norm()).item()
    assert err < 1e-4, f"fused prefill logits differ from the plain path: rel err {err:.2e}"
