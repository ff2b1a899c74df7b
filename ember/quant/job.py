"""The resumable job folder of `ember convert`: every stage's result and every finished layer, on disk.

Layout (JOB = OUTPUT/.job unless --job-dir):
  calibrate.json, calibrate.safetensors     token rows and where they came from
  measure/layer_NNN.json, measure/state.safetensors, measure.json
  alloc-KEY.json                            the choice per linear for one (target bpw, measurement)
  quant-KEY/layer_NNN.safetensors|json, quant-KEY/head.*, quant-KEY/state.safetensors
Every write goes to a temporary name and is renamed into place, so a killed run leaves either the old
file or the new one. A stage's files carry the key of what they were computed from; a mismatch (another
model, other calibration settings) discards them instead of mixing results."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


def key_of(obj) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class Job:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # ---- atomic file I/O ---------------------------------------------------------------------------
    def write_json(self, rel: str, data) -> None:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, p)

    def read_json(self, rel: str):
        p = self.path(rel)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None  # a partial file from an old crash: recompute

    def write_tensors(self, rel: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in (meta or {}).items()})
        os.replace(tmp, p)

    def read_tensors(self, rel: str) -> dict[str, torch.Tensor] | None:
        p = self.path(rel)
        if not p.exists():
            return None
        try:
            return load_file(str(p))
        except (SafetensorError, OSError):  # a corrupt checkpoint is recomputed, not trusted
            return None

    def read_meta(self, rel: str) -> dict | None:
        p = self.path(rel)
        if not p.exists():
            return None
        try:
            with safe_open(str(p), "pt") as f:
                return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        except (SafetensorError, OSError, json.JSONDecodeError):
            return None

    # ---- stage keys --------------------------------------------------------------------------------
    def check_key(self, folder: str, key: str) -> Path:
        """Make `folder` hold results of `key` only: a folder with another key is emptied."""
        d = self.path(folder)
        stamp = d / "KEY"
        if d.exists() and (not stamp.exists() or stamp.read_text().strip() != key):
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        if not stamp.exists():
            stamp.write_text(key + "\n")
        return d

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
