"""ember.io.gguf against the gguf package (dequantization, names), transformers (the bundled SmolLM2 GGUF)
and plain PyTorch (llama.cpp's q/k row permutation). Small GGUFs are written with gguf.GGUFWriter."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from ember.config import ModelConfig
from ember.errors import ConfigError, UnsupportedArchitectureError, WeightsError
from ember.io.gguf import GGUFFile, gguf_tensor_name_map

OUT, IN = 96, 512  # not square; IN is a multiple of every block size (32 and 256)
QUANTIZABLE = [QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]  # gguf.quants.quantize makes these
# K-quants (no quantizer in gguf-py): byte offsets of the fp16 scale fields in each block, per ggml's structs.
K_QUANT_F16_OFFSETS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}
ALL_TYPES = [QT.F32, QT.F16, *QUANTIZABLE, *K_QUANT_F16_OFFSETS]


def write_gguf(path: Path, tensors: dict, arch: str = "llama", layers: int = 1, kv: dict | None = None,
               hidden: int = IN, heads: int = 8, kv_heads: int = 2) -> Path:
    """tensors: gguf name -> numpy array (F32/F16) or (raw uint8 bytes (rows, row_bytes), quant type)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(2 * hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    for key, value in (kv or {}).items():
        add = {str: w.add_string, bool: w.add_bool, int: w.add_uint32, float: w.add_float32}[type(value)]
        add(f"{arch}.{key}" if not key.startswith("tokenizer.") else key, value)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def raw_tensor(qtype: QT, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw data to store, float source or None) for an (OUT, IN) tensor of type qtype."""
    x = rng.standard_normal((OUT, IN)).astype(np.float32)
    if qtype == QT.F32:
        return x, x
    if qtype == QT.F16:
        return x.astype(np.float16), x
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(x, qtype), x
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (OUT, IN // block, block_bytes), dtype=np.uint8)
    for off in K_QUANT_F16_OFFSETS[qtype]:  # sane scales: random bytes could be inf/nan halves
        assert off + 2 <= block_bytes
        scales = rng.uniform(0.001, 0.05, (OUT, IN // block)).astype(np.float16)
        raw[:, :, off:off + 2] = scales.view(np.uint8).reshape(OUT, IN // block, 2)
    return raw.reshape(OUT, -1), None


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    idx = (a != b).nonzero()
    if len(idx) == 0:
        return "no mismatch"
    i = tuple(idx[0].tolist())
    return f"{len(idx)} mismatches, first at {i}: {a[i].item()} vs {b[i].item()}"


# ---------------------------------------------------------------------------------------------------------
# 1. dequantization of every type, through GGUFFile, equals gguf's own dequantization of the bytes written


@pytest.fixture(scope="module")
def all_types_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    raws = {qt: raw_tensor(qt, rng) for qt in ALL_TYPES}
    tensors = {f"blk.{i}.ffn_up.weight": (raw, qt) if raw.dtype == np.uint8 else raw
               for i, (qt, (raw, _)) in enumerate(raws.items())}
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "types.gguf", tensors, layers=len(ALL_TYPES))
    return GGUFFile(path), raws


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_dequantize_every_type_matches_gguf(all_types_file, qtype):
    g, raws = all_types_file
    raw, source = raws[qtype]
    name = f"model.layers.{ALL_TYPES.index(qtype)}.mlp.up_proj.weight"
    assert g.tensor_type(name) == qtype.name
    assert g.tensor_shape(name) == (OUT, IN)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32)).reshape(OUT, IN)
    got = g.get_tensor(name)
    assert got.dtype == torch.float32 and got.shape == (OUT, IN)
    assert torch.equal(got, expected), first_mismatch(got, expected)
    if source is not None:  # and it is that tensor, not some other bytes: close to the float source
        rel = (got - torch.from_numpy(source)).norm() / torch.from_numpy(source).norm()
        assert rel < 0.15, f"{qtype.name}: relative error {rel:.3f} vs the float source"
    assert torch.equal(g.get_tensor(name, dtype=torch.float16), expected.half())


# ---------------------------------------------------------------------------------------------------------
# q/k un-permutation against a plain PyTorch version of llama.cpp's convert-time permutation


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's interleaved rows: per head (2, D/2) -> (D/2, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def test_q_k_rows_unpermuted(tmp_path):
    heads, kv_heads, head_dim, hidden = 4, 2, 16, 64
    q = torch.randn(heads * head_dim, hidden)
    k = torch.randn(kv_heads * head_dim, hidden)
    v = torch.randn(kv_heads * head_dim, hidden)
    tensors = {"blk.0.attn_q.weight": llama_cpp_permute(q, heads).numpy(),
               "blk.0.attn_k.weight": llama_cpp_permute(k, kv_heads).numpy(),
               "blk.0.attn_v.weight": v.numpy()}  # v is not permuted
    g = GGUFFile(write_gguf(tmp_path / "qk.gguf", tensors, hidden=hidden, heads=heads, kv_heads=kv_heads))
    for name, ref in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
        got = g.get_tensor(f"model.layers.0.self_attn.{name}.weight")
        assert torch.equal(got, ref), f"{name}: {first_mismatch(got, ref)}"


# ---------------------------------------------------------------------------------------------------------
# 2./3. the bundled SmolLM2 GGUF against transformers' GGUF loader


@pytest.fixture(scope="module")
def bundled():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from ember.io.bundled import bundled_model_path
    try:
        path = bundled_model_path()
    except ConfigError as e:
        pytest.skip(str(e))
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    # NOTE: what from_pretrained(gguf_file=...) does, minus the accelerate dependency and the weight init:
    # a meta-device model only supplies the gguf -> HF name map.
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    return GGUFFile(path), config, tensors


def test_bundled_tensors_match_transformers(bundled):
    g, _, ref = bundled
    names = g.tensor_names()
    assert set(names) == set(ref) - {"lm_head.weight"}
    for name in names:
        got, want = g.get_tensor(name), ref[name].float()
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
        assert torch.allclose(got, want, rtol=0, atol=1e-6), f"{name}: {first_mismatch(got, want)}"


def test_bundled_hf_config_matches_transformers(bundled):
    g, ref, _ = bundled
    cfg = g.hf_config()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert cfg[key] == getattr(ref, key), key
    rope_theta = getattr(ref, "rope_theta", None) or ref.rope_parameters["rope_theta"]
    assert cfg["rope_theta"] == pytest.approx(rope_theta, rel=1e-6)
    assert cfg["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert "lm_head.weight" not in g.tensor_names()
    mc = ModelConfig.from_hf(cfg)
    assert (mc.num_layers, mc.num_kv_heads, mc.tie_word_embeddings) == (ref.num_hidden_layers, 3, True)


def test_bundled_truncated_names_tensor(bundled, tmp_path):
    g = bundled[0]
    cut = tmp_path / "cut.gguf"
    with open(g.path, "rb") as f:
        cut.write_bytes(f.read(4 << 20))  # the header (~1.8 MB) and the start of the tensor data
    with pytest.raises(WeightsError, match="truncated") as e:
        GGUFFile(cut)
    assert str(cut) in str(e.value) and "tensor token_embd.weight" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# 4./5. bad files


@pytest.fixture
def small_file(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"token_embd.weight": rng.standard_normal((32, IN)).astype(np.float32),
               "blk.0.attn_norm.weight": np.ones(IN, np.float32)}
    return write_gguf(tmp_path / "small.gguf", tensors)


@pytest.mark.parametrize("keep", [0.5, 0.02], ids=["in-data", "in-header"])
def test_truncated_file(small_file, tmp_path, keep):
    data = small_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(WeightsError, match="truncated") as e:
        GGUFFile(cut)
    assert str(cut) in str(e.value)


@pytest.mark.parametrize("content", [b"", b"GGU", np.random.default_rng(2).bytes(4096)],
                         ids=["empty", "short", "random"])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="not a GGUF") as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


def test_corrupt_header(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(3).bytes(4096))  # right magic, garbage after it
    with pytest.raises(WeightsError, match="corrupt") as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="nope.gguf"):
        GGUFFile(tmp_path / "nope.gguf")


def test_gpt2_architecture_unsupported(tmp_path):
    tensors = {"token_embd.weight": np.zeros((8, 16), np.float32)}
    path = write_gguf(tmp_path / "gpt2.gguf", tensors, arch="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama"):
        GGUFFile(path)


def test_unknown_tensor_name(tmp_path):
    path = write_gguf(tmp_path / "x.gguf", {"blk.0.attn_q.weight": np.zeros((8, 16), np.float32),
                                            "blk.0.mystery.weight": np.zeros(16, np.float32)})
    with pytest.raises(WeightsError, match="blk.0.mystery.weight"):
        GGUFFile(path)


# ---------------------------------------------------------------------------------------------------------
# names and config details


def test_name_map_agrees_with_gguf_package():
    layers = 3
    ours = gguf_tensor_name_map(layers)
    theirs = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    for gguf_name, hf_name in ours.items():
        assert theirs.get_name(hf_name.removesuffix(".weight")) + ".weight" == gguf_name, hf_name
    assert len(set(ours.values())) == len(ours) == 3 + 9 * layers


def test_hf_config_extras(tmp_path):
    tensors = {"token_embd.weight": np.zeros((40, 64), np.float32),
               "output.weight": np.zeros((40, 64), np.float32)}
    kv = {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0, "attention.sliding_window": 4096,
          "tokenizer.ggml.bos_token_id": 5, "tokenizer.ggml.eos_token_id": 6,
          "tokenizer.ggml.eot_token_id": 7}
    g = GGUFFile(write_gguf(tmp_path / "x.gguf", tensors, kv=kv, hidden=64, heads=4, kv_heads=4))
    cfg = g.hf_config()
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert cfg["sliding_window"] == 4096
    assert cfg["tie_word_embeddings"] is False
    assert cfg["vocab_size"] == 40  # no vocab_size key: the embedding's rows
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (5, [6, 7])
    assert cfg["head_dim"] == 16
    assert "rope_freq_factors" not in cfg
    assert g.tensor_names() == ["model.embed_tokens.weight", "lm_head.weight"]
    mc = ModelConfig.from_hf(cfg)
    assert (mc.rope_scaling.kind, mc.rope_scaling.factor, mc.sliding_window) == ("linear", 4.0, 4096)
    assert mc.eos_token_ids == (6, 7)
    assert g.metadata["llama.rope.scaling.type"] == "linear"
    assert g.metadata["tokenizer.ggml.eot_token_id"] == 7


def test_rope_freqs_tensor_becomes_config(tmp_path):
    freqs = np.linspace(1.0, 8.0, 8).astype(np.float32)  # Llama 3.1 style: one factor per frequency
    tensors = {"token_embd.weight": np.zeros((40, 64), np.float32), "rope_freqs.weight": freqs}
    g = GGUFFile(write_gguf(tmp_path / "x.gguf", tensors, hidden=64, heads=4, kv_heads=4))
    cfg = g.hf_config()
    assert cfg["rope_freq_factors"] == freqs.tolist()
    assert cfg["tie_word_embeddings"] is True
    assert g.tensor_names() == ["model.embed_tokens.weight"]  # rope_freqs is not a model tensor
    assert ModelConfig.from_hf(cfg).rope_scaling.freq_factors == tuple(freqs.tolist())
