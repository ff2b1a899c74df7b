"""Write stage: the converted folder (docs/format.md): config.json, tokenizer files, sharded safetensors
with an index, and the manifest ember_quant.json.

Tensors are written in a fixed order (embeddings, then layer by layer, final norm, head) into shards of at
most `shard_bytes`; safetensors serializes a given dict deterministically, so the same inputs give
byte-identical files."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ember.quant.format import MANIFEST_NAME, write_manifest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")
SHARD_BYTES = 2 * 1024 ** 3


def source_config(src) -> dict:
    """The source's HF config dict (built from metadata for GGUF), saying float16 for the 16-bit parts."""
    if src.gguf is not None:
        cfg = dict(src.gguf.hf_config())
    else:
        cfg = json.loads((Path(src.path) / "config.json").read_text())
    cfg.pop("quantization_config", None)  # a GPTQ source's: the result is ember-quantized instead
    cfg["torch_dtype"] = "float16"
    if "dtype" in cfg:
        cfg["dtype"] = "float16"
    return cfg


def write_tokenizer(src, out: Path) -> None:
    """HF sources: their tokenizer files as they are; GGUF: tokenizer files rebuilt from the metadata."""
    if src.gguf is None:
        for name in TOKENIZER_FILES:
            if (Path(src.path) / name).is_file():
                shutil.copyfile(Path(src.path) / name, out / name)
    else:
        src.tokenizer().save(out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shard(tensors: dict[str, torch.Tensor], shard_bytes: int = SHARD_BYTES) -> list[dict[str, torch.Tensor]]:
    """Split in insertion order into dicts of at most shard_bytes (a bigger tensor gets a shard alone)."""
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += n
    if cur:
        shards.append(cur)
    return shards


def write_folder(out: str | Path, src, tensors: dict[str, torch.Tensor], manifest: dict,
                 shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write everything; stale model-*.safetensors of an earlier conversion are removed first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # written last: its presence marks a finished folder
    for old in out.glob("model-*.safetensors"):
        old.unlink()
    (out / "config.json").write_text(json.dumps(source_config(src), indent=2) + "\n")
    write_tokenizer(src, out)
    parts = shard(tensors, shard_bytes)
    weight_map, files = {}, []
    for j, part in enumerate(parts):
        name = f"model-{j + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in part.items()}, str(out / name), metadata={"format": "pt"})
        os.chmod(out / name, 0o666 & ~_umask())  # safetensors creates its files 0600: make them like the rest
        weight_map.update({k: name for k in part})
        files.append(out / name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_manifest(out / MANIFEST_NAME, manifest)
    return files
