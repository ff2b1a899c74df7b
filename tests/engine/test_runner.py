"""The static-buffer decode step (captured as CUDA graphs on the GPU) against plain per-token forwards,
and a sequence decoded alone against the same sequence inside a batch."""
import pytest
import torch

from ember.engine.kv_cache import KVCache
from ember.engine.runner import DecodeRunner
from ember.forward_batch import ForwardBatch
from ember.io.source import open_source
from ember.models.loader import build_model
from tests.models.tiny import write_tiny

PAGE = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_tiny("llama3.1", folder)
    src = open_source(folder)
    return build_model(src.config, src.tensors, torch.device("cpu"), torch.float32, 256, progress=False)


def prefill(model, kv, prompt, pages):
    batch = ForwardBatch.build([(prompt, 0, pages)], PAGE, "cpu")
    with torch.no_grad():
        return int(model(batch, kv.layers()).argmax(-1)[0])


def eager_greedy(model, prompt, steps):
    kv = KVCache(model.config, 17, PAGE, torch.float32, "cpu")
    pages = list(range(3, 3 + (len(prompt) + steps + PAGE - 1) // PAGE))
    out = [prefill(model, kv, prompt, pages)]
    for i in range(steps - 1):
        batch = ForwardBatch.build([([out[-1]], len(prompt) + i, pages)], PAGE, "cpu")
        with torch.no_grad():
            out.append(int(model(batch, kv.layers()).argmax(-1)[0]))
    return out


def start(model, prompts, max_batch):
    """A runner whose rows continue the prompts (4 pages each) after their prefill -> (runner, [[first token]])."""
    kv = KVCache(model.config, 17, PAGE, torch.float32, "cpu")  # page 16 = scratch
    runner = DecodeRunner(model, kv, max_batch=max_batch, max_pages=4, device=torch.device("cpu"))
    got = []
    for row, p in enumerate(prompts):
        pages = [row * 4 + i for i in range(4)]
        first = prefill(model, kv, p, pages)
        runner.set_sequence(row, first, len(p), pages)
        got.append([first])
    return runner, got


def test_runner_matches_eager_and_batch(model):
    prompts = [list(range(5, 5 + n)) for n in (7, 20, 33)]  # ragged, crossing page boundaries
    steps = 12
    expected = [eager_greedy(model, p, steps) for p in prompts]
    runner, got = start(model, prompts, max_batch=4)
    for _ in range(steps - 1):
        toks = runner.step(len(prompts), greedy=True).tolist()
        for row, t in enumerate(toks):
            got[row].append(t)
    assert got == expected


def test_logits_mode_and_advance(model):
    prompt = list(range(9, 30))
    expected = eager_greedy(model, prompt, 6)
    kv = KVCache(model.config, 17, PAGE, torch.float32, "cpu")
    runner = DecodeRunner(model, kv, max_batch=2, max_pages=4, device=torch.device("cpu"))
    pages = [0, 1, 2, 3]
    toks = [prefill(model, kv, prompt, pages)]
    runner.set_sequence(0, toks[0], len(prompt), pages)
    for _ in range(5):
        logits = runner.step(1, greedy=False)
        t = logits.argmax(-1)
        runner.advance(t)
        toks.append(int(t[0]))
    assert toks == expected


def test_launch_collect_pipeline_matches_steps(model):
    """Two steps in flight (launch the next before collecting this one) give the tokens of plain steps, and the
    runner refuses a third."""
    prompts = [list(range(5, 5 + n)) for n in (7, 20)]
    steps = 9
    expected = [eager_greedy(model, p, steps) for p in prompts]
    runner, got = start(model, prompts, max_batch=2)
    runner.launch(2)
    for i in range(steps - 1):
        if i + 1 < steps - 1:
            runner.launch(2)
        if i == 0:
            with pytest.raises(RuntimeError, match="in flight"):
                runner.launch(2)
        for row, t in enumerate(runner.collect()):
            got[row].append(t)
    runner.drain()
    assert got == expected


@pytest.mark.parametrize("pipelined", [False, True])
def test_greedy_tokens(model, pipelined):
    """The streaming loop the generator and `ember bench` share, plain and pipelined; stopping early leaves
    at most one step in flight, which drain() waits for."""
    prompts = [list(range(5, 12)), list(range(5, 25))]
    expected = [eager_greedy(model, p, 7) for p in prompts]
    runner, got = start(model, prompts, max_batch=2)
    for toks in runner.greedy_tokens(2, 6, pipelined):
        for row, t in enumerate(toks):
            got[row].append(t)
    assert got == expected
    runner, _ = start(model, prompts, max_batch=2)
    next(runner.greedy_tokens(2, 6, pipelined))
    assert len(runner._pending) == int(pipelined)
    runner.drain()
    assert not runner._pending
