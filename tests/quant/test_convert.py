"""`ember convert` end to end on a tiny random Llama (hidden 128, intermediate 256, 2 layers: every input
count a multiple of 64), on CPU: the result loads with ember.load and its logits follow the float model's,
the manifest's bpw is what the safetensors hold (recounted from tensor sizes), a killed run resumes to
byte-identical files, and the user errors are clear."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ember
from ember.errors import ConfigError, WeightsError
from ember.forward_batch import ForwardBatch
from ember.quant import quantize
from ember.quant.convert import convert
from ember.quant.quantize import SimulatedCrash
from ember.tokenizer import Tokenizer

TINY = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "bos_token_id": 256, "eos_token_id": 257, "tie_word_embeddings": False}
FAST = {"rows": 8, "row_len": 64, "device": "cpu", "progress": False}
LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def write_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer (256 byte tokens + <s>, </s>): any text, no training."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257})
    tok = Tokenizer(BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "add_bos_token": True}))


def write_tiny(folder: Path, seed: int = 0, edit=None, **over) -> Path:
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **over})).eval()
    with torch.no_grad():  # HF inits norms to 1 and tiny weights: perturb so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        if edit:
            edit(model)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return folder


def english_like(n_bytes: int, seed: int = 0) -> str:
    """Deterministic English-like text: common words in random order."""
    text = ("the of and to in is was that for it with as his on be at by had are but from or have an they "
            "which one you were her all she there would their we him been has when who will more no if out "
            "so said what up its about into than them can only other new some could time these two may")
    words = text.split(" ")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(words), (n_bytes // 4,), generator=g).tolist()
    return " ".join(words[i] for i in idx)[:n_bytes]


def calibration_file(folder: Path, n_bytes: int = 40_000) -> Path:
    p = folder / "calib.txt"
    p.write_text(english_like(n_bytes))
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    return calibration_file(tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="module")
def converted8(tiny, calib, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out8")
    manifest = convert(tiny, out, 8.0, head_bits=8, calibration=[calib], **FAST)
    return out, manifest


def all_logits(path: Path, ids: list[int]) -> torch.Tensor:
    llm = ember.load(path, device="cpu", max_seq_len=128)
    batch = ForwardBatch.build([(ids, 0, [0, 1])], llm.kv.page_size, "cpu", need_all_logits=True)
    with torch.no_grad():
        return llm.model(batch, llm.kv.layers())  # (T, V) float32


def test_8bit_conversion_loads_and_follows_the_float_model(tiny, converted8):
    out, manifest = converted8
    ids = Tokenizer.from_hf_folder(tiny).encode(english_like(200, seed=1))[:96]  # text like the calibration's
    ref, got = all_logits(tiny, ids), all_logits(out, ids)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 0.02, rel
    p_ref, p_got = ref.log_softmax(-1), got.log_softmax(-1)
    kl = float((p_ref.exp() * (p_ref - p_got)).sum(-1).mean())
    assert kl < 1e-3, kl
    assert manifest["bpw"] <= 8.0 and manifest["head_bits"] == 8
    assert set(manifest["layers"]) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS} | {"lm_head"}


def stored_bits_by_linear(folder: Path) -> dict[str, int]:
    """Bits of every piece of every quantized linear (all but .bias), from the safetensors headers."""
    bits: dict[str, int] = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names = st.keys()
            for name in names:
                prefix, piece = name.rsplit(".", 1)
                if piece in ("qweight", "scales", "qzeros", "perm", "had", "segments"):
                    t = st.get_tensor(name)
                    bits[prefix] = bits.get(prefix, 0) + t.numel() * t.element_size() * 8
    return bits


def test_manifest_bpw_is_what_is_stored(converted8):
    out, _ = converted8
    manifest = json.loads((out / "ember_quant.json").read_text())
    bits = stored_bits_by_linear(out)
    h, i, q, kv = 128, 256, 128, 64
    shapes = {"self_attn.qkv_proj": (q + 2 * kv, h), "self_attn.o_proj": (h, q), "mlp.gate_up_proj": (2 * i, h),
              "mlp.down_proj": (h, i)}
    dec_bits = sum(bits[f"model.layers.{j}.{n}"] for j in range(2) for n in LINEARS)
    dec_w = 2 * sum(a * b for a, b in shapes.values())
    assert manifest["bpw"] == pytest.approx(dec_bits / dec_w, rel=1e-12)
    head_w = 512 * h
    assert manifest["bpw_total"] == pytest.approx((dec_bits + bits["lm_head"]) / (dec_w + head_w), rel=1e-12)
    for j in range(2):
        for n, (a, b) in shapes.items():
            e = manifest["layers"][f"model.layers.{j}.{n}"]
            assert e["bpw"] == pytest.approx(bits[f"model.layers.{j}.{n}"] / (a * b), rel=1e-12)
            assert sum(s[1] for s in e["segments"]) == b and e["act_order"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.embed_tokens.weight" in index["weight_map"] and "lm_head.qweight" in index["weight_map"]


def test_killed_run_resumes_to_identical_files(tiny, calib, converted8, tmp_path, monkeypatch):
    ref_out, _ = converted8
    out = tmp_path / "resumed"
    monkeypatch.setenv("EMBER_CONVERT_CRASH", "quantize:1")
    with pytest.raises(SimulatedCrash):
        convert(tiny, out, 8.0, head_bits=8, calibration=[calib], **FAST)
    job = out / ".job"
    qdirs = list(job.glob("quant-*"))
    assert len(qdirs) == 1 and (qdirs[0] / "layer_000.safetensors").exists()
    assert not (qdirs[0] / "layer_001.safetensors").exists()
    monkeypatch.delenv("EMBER_CONVERT_CRASH")
    redone = []
    real = quantize.quantize_linear

    def counting(lin, H, cand):
        redone.append(lin)
        return real(lin, H, cand)

    monkeypatch.setattr(quantize, "quantize_linear", counting)
    convert(tiny, out, 8.0, head_bits=8, calibration=[calib], **FAST)
    assert len(redone) == 4  # only layer 1's four linears: layer 0 came from its checkpoint
    files = sorted(p.name for p in ref_out.glob("model-*.safetensors"))
    assert files == sorted(p.name for p in out.glob("model-*.safetensors"))
    for name in files:
        assert (ref_out / name).read_bytes() == (out / name).read_bytes(), name
    assert not qdirs[0].exists()  # the quantize checkpoints are dropped once written


def test_low_bpw_conversion_uses_mixed_settings(tiny, calib, converted8, tmp_path):
    """A second target reuses the measurement, lands at or under its budget and close to it, mixes widths,
    and follows the float model less closely than the 8-bit conversion but still closely."""
    out = tmp_path / "out3"
    job = converted8[0] / ".job"
    stamp = (job / "measure.json").stat().st_mtime_ns
    m = convert(tiny, out, 3.5, calibration=[calib], job_dir=job, **FAST)
    assert (job / "measure.json").stat().st_mtime_ns == stamp  # measured once for both targets
    assert 3.2 < m["bpw"] <= 3.5
    widths = {s[2] for e in m["layers"].values() for s in e["segments"]}
    assert len(widths) > 1
    ids = Tokenizer.from_hf_folder(tiny).encode(english_like(200, seed=2))[:96]
    ref = all_logits(tiny, ids)
    err = lambda path: float((all_logits(path, ids) - ref).norm() / ref.norm())
    assert err(converted8[0]) < err(out) < 0.3


def test_input_not_multiple_of_64_is_refused(tmp_path, calib):
    src = write_tiny(tmp_path / "m", hidden_size=128, intermediate_size=160)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.mlp\.down_proj has shape \[128, 160\]"):
        convert(src, tmp_path / "o", 4.0, calibration=[calib], **FAST)


def test_nan_weight_is_named(tmp_path, calib):
    def poison(model):
        model.model.layers[1].mlp.up_proj.weight[3, 5] = math.nan

    src = write_tiny(tmp_path / "m", edit=poison)
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        convert(src, tmp_path / "o", 4.0, calibration=[calib], **FAST)


def test_too_little_calibration_text_says_how_much(tiny, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a" * 300)  # 300 byte tokens + BOS
    with pytest.raises(ConfigError, match=r"gives 301 tokens, 512 are needed"):
        convert(tiny, tmp_path / "o", 4.0, calibration=[short], **FAST)


@pytest.mark.parametrize("bpw", [1.0, 12.0])
def test_unreachable_bpw_names_the_range(tiny, calib, tmp_path, bpw):
    with pytest.raises(ConfigError, match=r"from (\d+\.\d+) to (\d+\.\d+)") as e:
        convert(tiny, tmp_path / "o", bpw, calibration=[calib], **FAST)
    lo, hi = map(float, re.search(r"from (\d+\.\d+) to (\d+\.\d+)", str(e.value)).groups())
    assert 2.0 < lo < 3.0 and 8.0 < hi < 9.0  # 2-bit and 8-bit codes plus their scales
