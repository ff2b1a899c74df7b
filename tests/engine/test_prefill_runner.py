"""The padded static-buffer prefill (captured as CUDA graphs on the GPU) against a plain prefill: same
last-token logits, same KV for the prompt, nothing written for the pads."""
import pytest
import torch

from ember.engine import prefill_runner
from ember.engine.kv_cache import KVCache
from ember.engine.prefill_runner import PrefillRunner
from ember.forward_batch import ForwardBatch
from ember.io.source import open_source
from ember.models.loader import build_model
from tests.models.tiny import write_tiny

PAGE = 16


def _model(folder, device, dtype):
    write_tiny("llama3.1", folder)
    src = open_source(folder)
    return build_model(src.config, src.tensors, torch.device(device), dtype, 256, progress=False)


def _plain(model, prompt, pages, device, dtype):
    kv = KVCache(model.config, 9, PAGE, dtype, device)
    batch = ForwardBatch.build([(prompt, 0, pages)], PAGE, device)
    with torch.inference_mode():
        return model(batch, kv.layers()), kv


@pytest.mark.parametrize("n", [5, 16, 23, 40])
def test_padded_prefill_equals_plain(tmp_path, monkeypatch, n):
    monkeypatch.setattr(prefill_runner, "BUCKET", 16)  # pads of 11, 0, 9 and 8 tokens
    model = _model(tmp_path, "cpu", torch.float32)
    prompt = [(7 * i + 3) % 500 for i in range(n)]
    pages = [4, 1, 6]  # shuffled, more than the prompt needs
    ref, kv_ref = _plain(model, prompt, pages, "cpu", torch.float32)
    kv = KVCache(model.config, 9, PAGE, torch.float32, "cpu")
    runner = PrefillRunner(model, kv, 4, torch.device("cpu"), use_graphs=False, pad_eagerly=True)
    assert runner.applies(n)
    got = runner.forward(prompt, pages)
    assert (got - ref).abs().max().item() < 1e-5
    for (k, v), (k0, v0) in zip(kv.layers(), kv_ref.layers()):
        # every slot (prompt, pads' would-be slots, other pages) equals the plain prefill's (a matmul of more
        # rows rounds differently, hence no bit equality): the pads wrote nothing
        assert (k - k0).abs().max().item() < 1e-5 and (v - v0).abs().max().item() < 1e-5
    assert kv.data.abs().sum() > 0


def test_reused_runner_equals_plain_for_each_prompt(tmp_path, monkeypatch):
    """One runner, prompts of several lengths in turn (a shorter one after a longer one in the same bucket):
    the staging buffers keep nothing of the previous prompt that the next one reads."""
    monkeypatch.setattr(prefill_runner, "BUCKET", 16)
    model = _model(tmp_path, "cpu", torch.float32)
    kv = KVCache(model.config, 9, PAGE, torch.float32, "cpu")
    runner = PrefillRunner(model, kv, 4, torch.device("cpu"), use_graphs=False, pad_eagerly=True)
    for n, pages in ((40, [4, 1, 6]), (20, [2, 7]), (5, [3]), (30, [0, 5])):
        prompt = [(11 * i + n) % 500 for i in range(n)]
        ref, kv_ref = _plain(model, prompt, pages, "cpu", torch.float32)
        kv.data.zero_()
        assert (runner.forward(prompt, pages) - ref).abs().max().item() < 1e-5
        for (k, v), (k0, v0) in zip(kv.layers(), kv_ref.layers()):
            assert (k - k0).abs().max().item() < 1e-5 and (v - v0).abs().max().item() < 1e-5


def test_too_long_or_windowed_prompt_runs_eagerly(tmp_path):
    model = _model(tmp_path, "cpu", torch.float32)
    kv = KVCache(model.config, 9, PAGE, torch.float32, "cpu")
    runner = PrefillRunner(model, kv, 4, torch.device("cpu"), use_graphs=False, pad_eagerly=True, max_tokens=32)
    assert not runner.applies(100) and not runner.applies(0)
    prompt = list(range(3, 60))
    ref, _ = _plain(model, prompt, [0, 1, 2, 3], "cpu", torch.float32)
    assert torch.allclose(runner.forward(prompt, [0, 1, 2, 3]), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_prefill_matches_eager_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(prefill_runner, "BUCKET", 32)
    model = _model(tmp_path, "cuda", torch.float16)
    kv = KVCache(model.config, 9, PAGE, torch.float16, "cuda")
    runner = PrefillRunner(model, kv, 4, torch.device("cuda"))
    assert runner.use_graphs
    for n in (20, 29, 50):  # 20 and 29 share the 32-token graph: a replay with new inputs
        prompt = [(5 * i + n) % 500 for i in range(n)]
        ref, kv_ref = _plain(model, prompt, [3, 0, 5, 2], "cuda", torch.float16)
        kv.data.zero_()
        got = runner.forward(prompt, [3, 0, 5, 2]).clone()
        assert (got - ref).abs().max().item() < 2e-2
        for (k, v), (k0, v0) in zip(kv.layers(), kv_ref.layers()):
            assert (k - k0).abs().max().item() < 1e-2 and (v - v0).abs().max().item() < 1e-2
    assert sorted(runner.graphs) == [32, 64]
