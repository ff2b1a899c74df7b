"""The decode step's bookkeeping kernels (kernels/step.py) against their references: reference.decode_slots
and torch.argmax (first index of the maximum), over odd vocabularies, ties across chunks, -inf and NaN rows.
Without CUDA they run in Triton's CPU interpreter."""
import pytest
import torch

from ember.kernels import reference as ref
from tests.kernels.common import needs_cuda


def test_prepare_decode(device):
    from ember.kernels.step import prepare_decode
    g = torch.Generator().manual_seed(0)
    tables = torch.randperm(40, generator=g)[:30].view(3, 10).to(torch.int32).to(device)
    pos = torch.tensor([0, 17, 159], dtype=torch.int64, device=device)
    slot = torch.full((3,), -7, dtype=torch.int64, device=device)
    seq_lens = torch.zeros(3, dtype=torch.int32, device=device)
    prepare_decode(pos, tables, 16, slot, seq_lens)
    want_slot, want_lens = ref.decode_slots(pos, tables, 16)
    assert torch.equal(slot, want_slot) and torch.equal(seq_lens, want_lens)
    assert want_slot.tolist()[2] == int(tables[2, 9]) * 16 + 15


def _logits(v, dtype, device):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(5, v, generator=g)
    x[1, [3, v - 2]] = 9.0  # a tie far apart (different chunks): the first wins
    x[2, [v // 2, v // 2 + 1]] = 9.0  # a tie inside a chunk
    x[3] = float("-inf")  # nothing finite: index 0
    x[4, 7] = float("nan")  # NaN wins, as in torch.argmax
    return x.to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("v", [1000, 5003, 32768 + 5])
def test_greedy_advance(device, dtype, v):
    from ember.kernels.step import greedy_advance
    logits = _logits(v, dtype, device)
    want = logits.float().argmax(-1)
    tokens = torch.full((5,), -1, dtype=torch.int64, device=device)
    ids = torch.full((5,), -1, dtype=torch.int64, device=device)
    pos = torch.arange(5, dtype=torch.int64, device=device) * 10
    for step in range(2):  # the per-row counters must be zero again for the next launch
        greedy_advance(logits, tokens, ids, pos)
        assert torch.equal(tokens, want) and torch.equal(ids, want), f"launch {step}"
        assert pos.tolist() == [r * 10 + step + 1 for r in range(5)]
    assert want.tolist()[1:5] == [3, v // 2, 0, 7]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_greedy_advance_llama3_vocab_gpu(device, dtype):
    """A 128256-entry vocabulary (64 chunk programs) in every head dtype, inside a CUDA graph."""
    from ember.kernels.step import greedy_advance
    logits = _logits(128256, dtype, device)
    tokens, ids = (torch.zeros(5, dtype=torch.int64, device=device) for _ in range(2))
    pos = torch.zeros(5, dtype=torch.int64, device=device)
    greedy_advance(logits, tokens, ids, pos)  # eager first: allocates the scratch before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        greedy_advance(logits, tokens, ids, pos)
    for _ in range(2):
        logits.normal_()
        graph.replay()
        assert torch.equal(tokens, logits.float().argmax(-1)) and torch.equal(ids, tokens)
    assert pos.tolist() == [3] * 5
