"""Which format a path holds: a GGUF file, an HF folder (16/32-bit), a GPTQ folder or an ember-quantized
folder. The loader dispatches on this; nothing is guessed from file names except the .gguf magic."""
from __future__ import annotations

import json
from pathlib import Path

from ember.errors import ConfigError

GGUF_MAGIC = b"GGUF"


def detect_format(path: str | Path) -> str:
    """Returns "gguf", "ember", "gptq" or "hf". Raises ConfigError for anything else."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such file or folder")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC:
            return "gguf"
        raise ConfigError(f"{p}: not a GGUF file (magic {magic!r}); --model takes a .gguf file or an HF folder")
    if (p / "ember_quant.json").exists():
        return "ember"
    cfg = p / "config.json"
    if not cfg.exists():
        ggufs = sorted(p.glob("*.gguf"))
        hint = f" (it holds {ggufs[0].name}: pass that file)" if ggufs else ""
        raise ConfigError(f"{p}: no config.json, so not an HF model folder{hint}")
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg}: not valid JSON ({e})") from None
    method = qc.get("quant_method")
    if method == "gptq":
        return "gptq"
    if method:
        raise ConfigError(f"{p}: quantization method {method!r} is not supported (supported: gptq, ember)")
    return "hf"
