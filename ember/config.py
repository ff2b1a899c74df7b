"""Configuration as frozen dataclasses: the model's shape (from HF config.json or GGUF metadata) and the
engine's settings. The CLI builds its options from these, so defaults live in one place."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ember.errors import ConfigError

# HF config.json keys that must be present: without them the model's shape is unknown.
REQUIRED_HF_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling. kind: "none", "linear", "llama3" (Llama 3.1's frequency-dependent stretch) or
    "factors" (explicit per-frequency divisors, as Llama 3.1 GGUF files store them in rope_freqs)."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] | None = None

    @classmethod
    def from_hf(cls, d: dict | None) -> RopeScaling:
        if not d:
            return cls()
        kind = d.get("rope_type", d.get("type", "none"))
        if kind in ("default", None):
            return cls()
        if kind not in ("linear", "llama3"):
            raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: linear, llama3)")
        return cls(
            kind=kind,
            factor=float(d.get("factor", 1.0)),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder. Variants (Llama 2/3, Mistral, CodeLlama, SmolLM2) are flags."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: each token sees at most this many previous positions
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float16"
    # Raw quantization_config from config.json (GPTQ) or the ember manifest's summary; None for 16-bit.
    quantization: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config.json dict. Missing required keys are an error naming the key."""
        missing = [k for k in REQUIRED_HF_KEYS if k not in d]
        if missing:
            raise ConfigError(f"{source} is missing required field(s): {', '.join(missing)}")
        archs = d.get("architectures") or []
        if not archs:
            # model_type alone is enough for the families we know.
            mt = d.get("model_type")
            archs = {"llama": ["LlamaForCausalLM"], "mistral": ["MistralForCausalLM"]}.get(mt, [mt or "?"])
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        # transformers >= 5 writes rope_theta and the scaling into "rope_parameters"; older configs use
        # top-level rope_theta + rope_scaling. Real checkpoints come in both forms.
        rp = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rp if rp.get("rope_type") not in (None, "default") else None)
        sw = d.get("sliding_window")
        if d.get("use_sliding_window") is False:
            sw = None
        return cls(
            architecture=archs[0],
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=(RopeScaling(kind="factors", freq_factors=tuple(map(float, d["rope_freq_factors"])))
                          if d.get("rope_freq_factors") else RopeScaling.from_hf(scaling)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=int(sw) if sw else None,
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float16"),
            quantization=d.get("quantization_config"),
        )

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class EngineConfig:
    """Runtime settings for one loaded model. The CLI's --device/--dtype/--max-seq-len come from here."""

    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: float16 on cuda, float32 on cpu
    max_seq_len: int | None = None  # None: min(model context, 4096)
    page_size: int = 64  # tokens per KV-cache page
    num_pages: int | None = None  # None: enough for one sequence of max_seq_len
    memory_limit_gib: float | None = None  # pretend the device has only this much free (tests, shared GPUs)
    fp8_prefill: bool = False  # many-row matmuls on fp8 tensor cores (Hopper), activations rounded to e4m3

    def __post_init__(self):
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ConfigError(f"page_size must be a power of two, got {self.page_size}")
        if self.max_seq_len is not None and self.max_seq_len <= 0:
            raise ConfigError(f"max_seq_len must be positive, got {self.max_seq_len}")
        if self.dtype not in (None, "float16", "bfloat16", "float32"):
            raise ConfigError(f"dtype must be float16, bfloat16 or float32, got {self.dtype!r}")
