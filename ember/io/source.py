"""Open whatever --model points at (GGUF file, HF / GPTQ / ember folder) as one `Source`: a config, a
tensor store with names()/shape()/get(), and the tokenizer."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ember.config import ModelConfig
from ember.errors import ConfigError
from ember.io.detect import detect_format


@dataclass
class Source:
    path: Path
    format: str  # "gguf" | "hf" | "gptq" | "ember"
    config: ModelConfig
    tensors: object  # names() -> list[str], shape(name) -> tuple, get(name) -> torch.Tensor
    gguf: object | None = None  # the GGUFFile, for GGUF sources

    def tokenizer(self):
        from ember.tokenizer import Tokenizer

        if self.gguf is not None:
            tok = Tokenizer.from_gguf_metadata(self.gguf.metadata)
        else:
            tok = Tokenizer.from_hf_folder(self.path)
        tok.add_eos_ids(self.config.eos_token_ids)
        return tok


class _GGUFTensors:
    def __init__(self, f):
        self.f = f

    def names(self):
        return self.f.tensor_names()

    def shape(self, name):
        return self.f.tensor_shape(name)

    def get(self, name):
        return self.f.get_tensor(name)


def open_source(path: str | Path) -> Source:
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        from ember.io.gguf import GGUFFile

        f = GGUFFile(path)
        return Source(path, fmt, ModelConfig.from_hf(f.hf_config(), source=str(path)), _GGUFTensors(f), gguf=f)
    from ember.io.safetensors import SafetensorsFolder, read_config

    raw = read_config(path)
    cfg = ModelConfig.from_hf(raw, source=str(path / "config.json"))
    gen = path / "generation_config.json"
    if gen.exists():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ConfigError(f"{gen}: not valid JSON ({e})") from None
        extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        cfg = cfg.replace(eos_token_ids=tuple(dict.fromkeys([*cfg.eos_token_ids, *extra])))
    return Source(path, fmt, cfg, SafetensorsFolder(path))
