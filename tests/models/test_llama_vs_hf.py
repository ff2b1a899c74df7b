"""ember's PyTorch path against Hugging Face transformers, and incremental decode against full prefill."""
import pytest
import torch

from ember.forward_batch import ForwardBatch
from ember.io.source import open_source
from ember.models.loader import build_model
from tests.models.tiny import VARIANTS, write_tiny

PROMPT_LEN = 70  # > 64 and past the Mistral window (16) and several 16-token pages


def ember_logits(model, ids, page_size=16, chunks=None):
    """Run `ids` through ember, as one prefill or as `chunks` (list of lengths); logits for every position."""
    cfg = model.config
    n_pages = -(-len(ids) // page_size)
    kv = [(torch.zeros(n_pages, cfg.num_kv_heads, page_size, cfg.head_dim),
           torch.zeros(n_pages, cfg.num_kv_heads, page_size, cfg.head_dim)) for _ in range(cfg.num_layers)]
    pages = list(range(n_pages))[::-1]  # non-identity page order: block tables must be honoured
    out, done = [], 0
    for n in chunks or [len(ids)]:
        batch = ForwardBatch.build([(ids[done:done + n], done, pages)], page_size, "cpu", need_all_logits=True)
        with torch.no_grad():
            out.append(model(batch, kv))
        done += n
    return torch.cat(out)


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = write_tiny(request.param, folder)
    src = open_source(folder)
    model = build_model(src.config, src.tensors, torch.device("cpu"), torch.float32, 256, progress=False)
    return request.param, hf, model


def test_logits_match_transformers(pair):
    name, hf, model = pair
    ids = torch.randint(3, 512, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    got = ember_logits(model, ids)
    err = (got - ref).abs().max().item()
    assert err < 1e-3, f"{name}: max |ember - transformers| = {err:.2e}"


def test_incremental_decode_equals_prefill(pair):
    name, _, model = pair
    ids = torch.randint(3, 512, (PROMPT_LEN,), generator=torch.Generator().manual_seed(2)).tolist()
    full = ember_logits(model, ids)
    # a prefill of 37 tokens (ends mid-page), a chunk of 5, then one token at a time
    steps = ember_logits(model, ids, chunks=[37, 5] + [1] * (PROMPT_LEN - 42))
    err = (full - steps).abs().max().item()
    assert err < 1e-4, f"{name}: incremental vs full max diff {err:.2e}"


def test_sliding_window_changes_mistral_logits(pair):
    """Guards the test above: the window must actually matter at this prompt length."""
    name, _, model = pair
    if name != "mistral":
        pytest.skip("mistral only")
    ids = torch.randint(3, 512, (PROMPT_LEN,), generator=torch.Generator().manual_seed(3)).tolist()
    with_window = ember_logits(model, ids)
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    try:
        without = ember_logits(model, ids)
    finally:
        for layer in model.model.layers:
            layer.self_attn.sliding_window = 16
    assert (with_window[:16] - without[:16]).abs().max() < 1e-5
    assert (with_window[-1] - without[-1]).abs().max() > 1e-3
