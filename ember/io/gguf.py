"""GGUF files (llama.cpp's format): metadata, an HF-style config and dequantized tensors in HF layout.

Built on the `gguf` package: GGUFReader parses the header and memory-maps the data, so opening a file reads
only its header; gguf.quants.dequantize turns one tensor at a time into float32. Tensor names and layouts are
translated to HF's, so the rest of ember never sees a GGUF name. Only the "llama" architecture is supported
(Llama 2/3/3.1, Mistral, CodeLlama and SmolLM2 GGUFs all use it)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor
from gguf.quants import dequantize

from ember.errors import ConfigError, UnsupportedArchitectureError, WeightsError

SUPPORTED_ARCHITECTURES = ("llama",)
MAGIC = b"GGUF"

# gguf name -> HF name, for the tensors outside the layers and for blk.{i}.<key>.weight inside them.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Llama 3.1 GGUFs keep the llama3 rope's per-frequency factors as a tensor; it is config, not a weight.
ROPE_FREQS = "rope_freqs.weight"


def gguf_tensor_name_map(num_layers: int) -> dict[str, str]:
    """gguf tensor name -> HF tensor name for a llama model of `num_layers` layers."""
    names = dict(_GLOBAL_NAMES)
    for i in range(num_layers):
        for gguf_key, hf_key in _LAYER_NAMES.items():
            names[f"blk.{i}.{gguf_key}.weight"] = f"model.layers.{i}.{hf_key}.weight"
    return names


class _Truncated(Exception):
    def __init__(self, what: str, end: int, size: int):
        super().__init__(what)
        self.what, self.end, self.size = what, end, size


class _CheckedReader(GGUFReader):
    """GGUFReader that says where a short file ends instead of failing inside numpy.

    NOTE: overrides two private methods of gguf's reader (_get, _build_tensors); their signatures and the
    layout of a tensor-info field's parts (name_len, name, n_dims, dims, type, offset) are stable since
    gguf 0.10."""

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > self.data.size:
            raise _Truncated("the header (or it is corrupt)", end, int(self.data.size))
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields):
        # Check every tensor's extent up front, so a cut file names the first tensor it lacks.
        for field in fields:
            dims, raw_type, rel_offset = field.parts[3], field.parts[4], field.parts[5]
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
            nbytes = math.prod(int(d) for d in dims) * block_bytes // block
            end = int(start_offs) + int(rel_offset[0]) + nbytes
            if end > self.data.size:
                raise _Truncated(f"tensor {field.name}", end, int(self.data.size))
        super()._build_tensors(start_offs, fields)


def _open_reader(path: Path) -> GGUFReader:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise WeightsError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    if head != MAGIC:
        raise WeightsError(f"{path} is not a GGUF file: it starts with {head!r}, not {MAGIC!r}; "
                           "pass a .gguf file or an HF model folder")
    try:
        return _CheckedReader(path)
    except _Truncated as e:
        raise WeightsError(f"{path}: file is truncated: {e.what} needs bytes up to {e.end} but the file has "
                           f"{e.size}; download or convert it again") from None
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, TypeError) as e:
        raise WeightsError(f"{path} is a corrupt GGUF file ({type(e).__name__}: {e}); "
                           "download or convert it again") from None


def _field_value(field: Any) -> Any:
    value = field.contents()
    if field.types == [GGUFValueType.FLOAT32]:
        # float32 in the file: its shortest decimal (1e-05, not 9.999999747378752e-06) is what was written.
        value = float(str(np.float32(value)))
    return value


def _unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. Its rope rotates adjacent pairs, so its converter reorders each
    head's rows from HF's halves [x_0..x_{D/2-1} | x_{D/2}..x_{D-1}] to pairs (x_j, x_{j+D/2}).
    w: (n_heads * D, in) in GGUF order -> the same shape in HF (rotate-half) order."""
    out, inp = w.shape
    # (H, D/2, 2, in) -> (H, 2, D/2, in)
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


class GGUFFile:
    """One llama-architecture GGUF file, opened lazily; tensors are read and dequantized on request."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = _open_reader(self.path)
        try:
            self.metadata: dict[str, Any] = {
                k: _field_value(f) for k, f in self._reader.fields.items() if not k.startswith("GGUF.")
            }
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise WeightsError(f"{self.path} has corrupt metadata ({e}); "
                               "download or convert it again") from None
        self.architecture: str = str(self.metadata.get("general.architecture", ""))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{self.path}: GGUF architecture {self.architecture or '(missing)'!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        self._tensors, self._rope_freqs = self._map_tensors()

    def _key(self, name: str, default: Any = ...) -> Any:
        """Metadata value of `<architecture>.<name>`; a ConfigError naming the key if required and absent."""
        key = f"{self.architecture}.{name}"
        if key in self.metadata:
            return self.metadata[key]
        if default is ...:
            raise ConfigError(f"{self.path}: GGUF metadata lacks required field {key}")
        return default

    def _map_tensors(self) -> tuple[dict[str, ReaderTensor], ReaderTensor | None]:
        names = gguf_tensor_name_map(int(self._key("block_count")))
        tensors, unknown, rope_freqs = {}, [], None
        for t in self._reader.tensors:
            if t.name == ROPE_FREQS:
                rope_freqs = t
            elif t.name in names:
                tensors[names[t.name]] = t
            else:
                unknown.append(t.name)
        if unknown:
            raise WeightsError(f"{self.path} has tensors ember does not know for a llama model: "
                               f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
        return tensors, rope_freqs

    def _tensor(self, hf_name: str) -> ReaderTensor:
        if hf_name not in self._tensors:
            raise WeightsError(f"{self.path} has no tensor {hf_name}")
        return self._tensors[hf_name]

    def tensor_names(self) -> list[str]:
        """HF names of the model tensors, in file order (rope_freqs is config, not listed)."""
        return list(self._tensors)

    def tensor_shape(self, hf_name: str) -> tuple[int, ...]:
        """Shape in PyTorch/HF order, (out, in) for a linear; GGUF lists dims the other way round."""
        return tuple(int(d) for d in reversed(self._tensor(hf_name).shape.tolist()))

    def tensor_type(self, hf_name: str) -> str:
        return self._tensor(hf_name).tensor_type.name

    def get_tensor(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized, in HF layout (q_proj/k_proj rows back in rotate-half order)."""
        w = self._dequantize(self._tensor(hf_name), hf_name).reshape(self.tensor_shape(hf_name))
        if hf_name.endswith("self_attn.q_proj.weight"):
            w = _unpermute_rows(w, int(self._key("attention.head_count")))
        elif hf_name.endswith("self_attn.k_proj.weight"):
            w = _unpermute_rows(w, int(self._num_kv_heads()))
        return w.to(dtype)

    def _dequantize(self, t: ReaderTensor, hf_name: str) -> torch.Tensor:
        try:
            arr = dequantize(t.data, t.tensor_type)  # float32, (out, in); F32 comes back as a view of the map
        except NotImplementedError:
            raise WeightsError(f"{self.path}: tensor {hf_name} has type {t.tensor_type.name}, which the "
                               "gguf package cannot dequantize; upgrade gguf or pick another quantization"
                               ) from None
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())

    def _num_kv_heads(self) -> int:
        kv = self._key("attention.head_count_kv", self._key("attention.head_count"))
        if isinstance(kv, list):  # per-layer counts: ember needs them all equal
            if len(set(kv)) != 1:
                raise ConfigError(f"{self.path}: per-layer head_count_kv {sorted(set(kv))} is not supported")
            kv = kv[0]
        return int(kv)

    def hf_config(self) -> dict:
        """An HF-style config.json dict for ModelConfig.from_hf (plus the ember key "rope_freq_factors")."""
        heads = int(self._key("attention.head_count"))
        hidden = int(self._key("embedding_length"))
        vocab = self._key("vocab_size", None)
        if vocab is None:  # older files: the embedding's rows, else the token list
            embed = "model.embed_tokens.weight"
            vocab = (self.tensor_shape(embed)[0] if embed in self._tensors
                     else len(self.metadata.get("tokenizer.ggml.tokens", [])))
        cfg: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": int(self._key("feed_forward_length")),
            "num_hidden_layers": int(self._key("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": self._num_kv_heads(),
            "head_dim": int(self._key("attention.key_length",
                                      self._key("rope.dimension_count", hidden // heads))),
            "rms_norm_eps": float(self._key("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(self._key("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._key("context_length", 4096)),
            "vocab_size": int(vocab),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
        }
        tok = "tokenizer.ggml."
        if tok + "bos_token_id" in self.metadata:
            cfg["bos_token_id"] = int(self.metadata[tok + "bos_token_id"])
        # Instruct GGUFs may name end-of-turn tokens besides eos (Llama 3's <|eot_id|>): all of them stop.
        eos = [int(self.metadata[tok + k]) for k in ("eos_token_id", "eot_token_id", "eom_token_id")
               if tok + k in self.metadata]
        if eos:
            eos = list(dict.fromkeys(eos))
            cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        if self._key("attention.sliding_window", None):
            cfg["sliding_window"] = int(self._key("attention.sliding_window"))
        scaling = self._key("rope.scaling.type", "none")
        if scaling != "none":  # anything but linear is passed on for ModelConfig to reject by name
            factor = float(self._key("rope.scaling.factor", 1.0))
            cfg["rope_scaling"] = {"rope_type": scaling, "factor": factor}
        if self._rope_freqs is not None:
            cfg["rope_freq_factors"] = self._dequantize(self._rope_freqs, ROPE_FREQS).flatten().tolist()
        return cfg
