"""The bundled SmolLM2-135M-Instruct GGUF: ember against transformers loading the same file."""
import pytest
import torch

from ember.cli import main
from ember.forward_batch import ForwardBatch
from ember.io.bundled import bundled_model_path

PROMPTS = [
    "The history of the printing press begins with",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "La ville de Paris est connue pour",
]


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    path = bundled_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm():
    import ember

    return ember.load(device="cpu", max_seq_len=512)


def test_logits_match_transformers(hf_model, llm):
    text = ("Once upon a time, in a small village between the mountains and the sea, there lived an old "
            "clockmaker who repaired every clock in town. Children visited his shop after school to watch "
            "the gears turn, and he told them stories about the people who had owned each clock. One winter "
            "evening a stranger arrived with a broken pocket watch that no one else could fix.")
    ids = llm.tokenizer.encode(text)
    assert len(ids) >= 64
    pages = llm.generator.blocks.allocate(-(-len(ids) // llm.kv.page_size))
    try:
        batch = ForwardBatch.build([(ids, 0, pages)], llm.kv.page_size, "cpu", need_all_logits=True)
        with torch.no_grad():
            got = llm.model(batch, llm.kv.layers())
            ref = hf_model(torch.tensor([ids])).logits[0].float()
    finally:
        llm.generator.blocks.release(pages)
    err = (got - ref).abs().max().item()
    assert err < 1e-3, f"max |ember - transformers| = {err:.2e} over {len(ids)} tokens"


@pytest.mark.parametrize("prompt", PROMPTS, ids=["english", "code", "french"])
def test_cli_greedy_equals_transformers(prompt, hf_model, llm, capsys):
    n = 32
    ids = llm.tokenizer.encode(prompt)  # transformers' GGUF tokenizer is wrong for SmolLM2: feed our ids
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                eos_token_id=sorted(llm.tokenizer.eos_ids), pad_token_id=0)
    new = out[0, len(ids):].tolist()
    new = [t for t in new if t not in llm.tokenizer.eos_ids]
    expected = llm.tokenizer.decode(new)
    assert len(new) >= 24, "transformers stopped early: pick a prompt that runs on"
    rc = main(["generate", "--raw", "--temperature", "0", "--max-new-tokens", str(n), "--prompt", prompt,
               "--device", "cpu", "--max-seq-len", "512", "-q"])
    assert rc == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert lines[-1].startswith("[prompt ") and "decode" in lines[-1] and "peak memory" in lines[-1]
    assert "\n".join(lines[:-1]) == expected
