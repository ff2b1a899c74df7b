"""Calibrate stage: calibration text -> token rows (rows, L), the inputs every later stage runs on.

Each file is tokenized on its own (with the tokenizer's BOS in front when it adds one), the token streams
are concatenated in file order, and `rows` windows of `row_len` tokens are taken at evenly spaced,
non-overlapping starts, so the rows sample the whole text rather than its beginning."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.errors import ConfigError


@dataclass
class Calibration:
    tokens: torch.Tensor  # (rows, L) int64
    files: list[str]
    sha256: list[str]
    available: int  # tokens the text gave

    def info(self) -> dict:
        rows, L = self.tokens.shape
        return {"files": self.files, "sha256": self.sha256, "rows": rows, "row_len": L,
                "tokens": rows * L, "available_tokens": self.available}


def default_files() -> list[Path]:
    """The bundled calibration texts (ember.quant.data), or [] when the package data is absent."""
    try:
        from ember.quant.data import default_calibration_files
    except ImportError:
        return []
    return list(default_calibration_files())


def read_texts(files: list[str | Path]) -> list[tuple[str, str, str]]:
    """[(path, sha256, text)]; a missing or non-UTF-8 file is a ConfigError naming it."""
    out = []
    for f in files:
        p = Path(f)
        try:
            raw = p.read_bytes()
            out.append((str(p), hashlib.sha256(raw).hexdigest(), raw.decode("utf-8")))
        except FileNotFoundError:
            raise ConfigError(f"calibration file {p} does not exist") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"calibration file {p} is not UTF-8 text ({e})") from None
    return out


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text)
    return ids


def make_rows(ids: list[int], rows: int | None, row_len: int, max_rows: int = 64, min_rows: int = 1) -> torch.Tensor:
    """`rows` windows of `row_len` tokens at evenly spaced starts. rows None: as many as the text gives, up
    to max_rows and at least min_rows. Too little text is a ConfigError saying how many tokens were found
    and how many are needed."""
    if row_len < 16:
        raise ConfigError(f"--row-len {row_len} is too short (at least 16 tokens)")
    if rows is not None and rows < 1:
        raise ConfigError(f"--rows must be at least 1, got {rows}")
    want = rows if rows is not None else max(min_rows, min(max_rows, len(ids) // row_len))
    if len(ids) < want * row_len:
        raise ConfigError(f"the calibration text gives {len(ids)} tokens, {want * row_len} are needed "
                          f"({want} rows x {row_len}): pass more text with --calibration or lower "
                          f"--rows / --row-len")
    t = torch.tensor(ids, dtype=torch.int64)
    spare = len(ids) - want * row_len  # spread the unused tokens evenly between the windows
    starts = [r * row_len + (spare * r) // max(1, want - 1) for r in range(want)]
    return torch.stack([t[s:s + row_len] for s in starts])


def calibrate(tokenizer, files: list[str | Path], rows: int | None, row_len: int, max_rows: int = 64,
              min_rows: int = 1) -> Calibration:
    if not files:
        raise ConfigError("no calibration text: the bundled texts are not installed; pass --calibration FILE")
    texts = read_texts(files)
    ids = token_stream(tokenizer, [t for _, _, t in texts])
    return Calibration(make_rows(ids, rows, row_len, max_rows, min_rows), [p for p, _, _ in texts],
                       [h for _, h, _ in texts], len(ids))
