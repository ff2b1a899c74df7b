"""HF model folders: config.json plus one or many *.safetensors (with model.safetensors.index.json).

Tensors are read lazily through safetensors' memory map, one at a time, so the host holds about one
tensor, not the model. Every file's header is checked against its size up front, so a truncated download
is a clear error naming the file instead of a crash in the middle of loading."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ember.errors import ConfigError, WeightsError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def read_header(path: Path) -> dict:
    """The safetensors JSON header, validated against the file size. Raises WeightsError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise WeightsError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if end - start != numel * _DTYPE_BYTES.get(info["dtype"], 0) and info["dtype"] in _DTYPE_BYTES:
            raise WeightsError(f"{path}: tensor {name} has {end - start} bytes for shape {info['shape']} "
                               f"{info['dtype']}: the file is corrupt")
        if end > data:
            raise WeightsError(f"{path}: file is truncated: tensor {name} needs bytes up to {8 + n + end}, "
                               f"the file has {size}. Download it again.")
    return header


class SafetensorsFolder:
    """All tensors of an HF folder by name. Shapes and dtypes come from the headers; data is read on get()."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightsError(f"{index}: corrupt index ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).exists()]
            if missing:
                raise WeightsError(f"{self.folder}: shards named in the index are missing: {', '.join(missing)}")
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise WeightsError(f"{self.folder}: no *.safetensors files (ember reads safetensors, "
                                   f"not .bin/.pt; convert them with transformers' save_pretrained)")
        self._where: dict[str, tuple[str, dict]] = {}
        for fname in files:
            for name, info in read_header(self.folder / fname).items():
                if name != "__metadata__":
                    self._where[name] = (fname, info)
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def nbytes(self, name: str) -> int:
        start, end = self._where[name][1]["data_offsets"]
        return end - start

    def get(self, name: str) -> torch.Tensor:
        fname, _ = self._where[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.folder / fname), framework="pt", device="cpu")
        return self._handles[fname].get_tensor(name)


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise ConfigError(f"{folder}: no config.json (an HF model folder needs config.json + *.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
