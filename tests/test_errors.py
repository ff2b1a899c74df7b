"""Bad input gets one clear error (an EmberError subclass with a message that names the problem)."""
import json

import pytest
import torch

import ember
from ember.errors import (
    ConfigError,
    OutOfMemoryError,
    PromptTooLongError,
    UnsupportedArchitectureError,
    WeightsError,
)
from ember.io.source import open_source
from ember.models.loader import build_model
from tests.models.tiny import write_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_tiny("llama2", folder)
    return folder


def _load(folder):
    src = open_source(folder)
    return build_model(src.config, src.tensors, torch.device("cpu"), torch.float32, 64, progress=False)


def test_truncated_safetensors(tiny, tmp_path):
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text((tiny / "config.json").read_text())
    data = (tiny / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model.safetensors: file is truncated: tensor .* Download it again"):
        _load(bad)


def test_config_missing_field(tiny, tmp_path):
    cfg = json.loads((tiny / "config.json").read_text())
    del cfg["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="missing required field.*num_attention_heads"):
        open_source(tmp_path)


def test_unknown_architecture(tiny, tmp_path):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(tiny / "model.safetensors")
    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForCausalLM.*supported: LlamaForCausalLM"):
        _load(tmp_path)


def test_missing_and_misshaped_tensor(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny / "model.safetensors")
    (tmp_path / "config.json").write_text((tiny / "config.json").read_text())
    t2 = dict(tensors)
    del t2["model.layers.1.mlp.up_proj.weight"]
    save_file(t2, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        _load(tmp_path)
    t3 = dict(tensors)
    t3["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(t3, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"k_proj.weight has shape \[8, 64\], the config implies \[64, 64\]"):
        _load(tmp_path)
    t4 = dict(tensors, **{"model.layers.0.extra.weight": torch.zeros(3)})
    save_file(t4, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\) model.layers.0.extra.weight"):
        _load(tmp_path)


def test_prompt_too_long():
    llm = ember.load(device="cpu", max_seq_len=32)
    with pytest.raises(PromptTooLongError, match=r"prompt has \d+ tokens but the context holds 32.*--max-seq-len"):
        llm.generate("word " * 100, raw=True)
    assert llm.generate("Hello", raw=True, max_new_tokens=2, temperature=0)  # still usable afterwards


def test_model_too_big_for_memory():
    with pytest.raises(OutOfMemoryError) as e:
        ember.load(device="cpu", max_seq_len=8192, memory_limit_gib=0.4)
    msg = str(e.value)
    assert "needs" in msg and "GiB" in msg and "only 0.40 GiB is free" in msg and "--max-seq-len" in msg


def test_cli_reports_errors_without_traceback(capsys, tmp_path):
    from ember.cli import main

    assert main(["info", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file" in err and "Traceback" not in err


def test_memory_estimate_counts_the_dequantized_matrix_of_a_quantized_model():
    from ember.config import ModelConfig
    from ember.memory import estimate

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=1000, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    dense = estimate(cfg, 10**6, 256, torch.float16)
    quant = estimate(cfg, 10**6, 256, torch.float16, quantized=True)
    assert quant.workspace - dense.workspace == 2 * max(64 * (64 + 2 * 32), 64 * 2 * 160, 64 * 1000)
