"""The Python API and the CLI on the bundled model: streaming, stop strings, seeds, chat, info."""
import builtins

import pytest

import ember
from ember.cli import main
from ember.engine.generator import StopStringFilter
from ember.errors import ConfigError


@pytest.fixture(scope="module")
def llm():
    return ember.load(device="cpu", max_seq_len=256)


def test_stream_equals_generate_and_stats(llm):
    kw = dict(temperature=0, max_new_tokens=20)
    pieces = list(llm.stream("Write one sentence about the sea.", **kw))
    assert len(pieces) > 3 and all(isinstance(p, str) and p for p in pieces)
    s = llm.stats
    assert s.prompt_tokens > 5 and 1 <= s.generated_tokens <= 20 and s.finish_reason in ("stop", "length")
    assert s.prefill_tok_s > 0 and s.peak_memory_gib > 0
    assert "".join(pieces) == llm.generate("Write one sentence about the sea.", **kw)


def test_seed_reproducible_and_sampling_varies(llm):
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=16, ignore_eos=True)
    a = llm.generate("Tell me a story.", seed=7, **kw)
    assert a == llm.generate("Tell me a story.", seed=7, **kw)
    others = {llm.generate("Tell me a story.", seed=s, **kw) for s in (1, 2, 3)}
    assert len(others | {a}) > 1


def test_stop_string_cuts_output(llm):
    full = llm.generate("The capital of France is", raw=True, temperature=0, max_new_tokens=24)
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    cut = llm.generate("The capital of France is", raw=True, temperature=0, max_new_tokens=24, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert llm.stats.finish_reason == "stop"


def test_stop_filter_holds_back_partial_matches():
    f = StopStringFilter(("STOP",))
    out = f.push("abc ST") + f.push("O") + f.push("x def")
    assert out + f.flush() == "abc STOx def"
    g = StopStringFilter(("STOP",))
    assert g.push("abc ST") + g.push("OP more") == "abc " and g.stopped


def test_unknown_sampling_kwarg_is_clear(llm):
    with pytest.raises(ConfigError, match="unknown sampling parameter.*temprature"):
        llm.generate("hi", temprature=0.5)


def test_info(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for key in ("LlamaForCausalLM", "gguf", "parameters", "134.5 M", "KV cache per 1k tokens", "Q4_1"):
        assert key in out, key


def test_chat_keeps_history(monkeypatch, capsys):
    lines = iter(["My name is Ada.", "What is my name?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert main(["chat", "--device", "cpu", "--temperature", "0", "--max-new-tokens", "24", "-q",
                 "--max-seq-len", "512"]) == 0
    import re

    stats = re.findall(r"\[prompt (\d+) tok, generated (\d+) tok", capsys.readouterr().err)
    assert len(stats) == 2
    (p1, g1), (p2, _) = [(int(a), int(b)) for a, b in stats]
    # the second turn's prompt holds the first turn (prompt + reply) plus the new message
    assert p2 > p1 + g1


def test_default_dtype_by_device_and_format():
    """Quantized models run in float16 on the GPU (the packed-half decode); dense ones keep their bf16;
    CPU always float32; an explicit dtype wins."""
    import torch

    from ember.llm import resolve_dtype

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype(None, gpu, "bfloat16", quantized=True) == torch.float16
    assert resolve_dtype(None, gpu, "bfloat16") == torch.bfloat16
    assert resolve_dtype(None, gpu, "float32") == torch.float16
    assert resolve_dtype(None, cpu, "bfloat16", quantized=True) == torch.float32
    assert resolve_dtype("bfloat16", gpu, "float16", quantized=True) == torch.bfloat16
