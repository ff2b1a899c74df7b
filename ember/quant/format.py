"""The ember quantized format, version 1: one source of truth for the layout described in docs/format.md.

Python API (tensor shapes: N = out_features, K = in_features, R = packed rows, G = scale groups):

- `QuantizedTensor`: qweight int32 (R, N), scales fp16 (G, N), qzeros uint8 (G, N) | None, perm int32 (K,)
  | None, had int (0 = no rotation), segments int32 (S, 6), bias (N,) | None, in_features, out_features.
  Methods: `.to(device)`, `.state_dict(prefix)`, `QuantizedTensor.from_state_dict(prefix, tensors)` (strict:
  a missing / mis-shaped / unexpected piece raises WeightsError naming it), `.stored_bits()`, `.bpw()`.
- `pack(q, scales, zeros, segments, perm=None, had=0, bias=None) -> QuantizedTensor`: q (N, K) unsigned codes
  in permuted input order, scales (G, N), zeros (G, N) | None, segments a list of (k_len, bits, group_size).
- `unpack_codes(qt) -> (N, K) int32` (permuted order); `dequantize(qt, dtype) -> W (N, K)` in the ORIGINAL
  input order, rotation undone, so that `x @ W.T` is what the layer computes.
- `group_rows(qt)`, `input_bits(qt)`: per permuted input k, its row in `scales` and its width.
- `upgrade(qt, version)`: a tensor read from an older format version in the current layout.
- `write_manifest(path, dict)`, `read_manifest(path)`; `FORMAT_NAME`, `FORMAT_VERSION = 2` (reads 1 and 2).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ember.errors import WeightsError
from ember.quant.hadamard import block_hadamard

FORMAT_NAME = "ember-quant"
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)  # version 1 stored 3-bit codes as a 2-bit and a 1-bit plane: repacked on load
MANIFEST_NAME = "ember_quant.json"
# Bit planes of each width, low plane first (docs/format.md): every field of a power-of-two width sits in one
# word; the 3-bit plane packs ten fields per word plus two spare bits, which carry the block's last 4 codes.
PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (3,), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
PLANES_V1 = {**PLANES, 3: (2, 1)}
BLOCK = 64  # inputs per packing block
PIECES = ("qweight", "scales", "qzeros", "perm", "had", "segments", "bias")


def valid_group_size(g: int, k_len: int) -> bool:
    """32 or a multiple of 64 that divides the segment (GPTQ group_size -1 is one group of the segment)."""
    return (g == 32 or (g > 0 and g % BLOCK == 0)) and k_len % g == 0


def make_segments(spec: list[tuple[int, int, int]]) -> torch.Tensor:
    """[(k_len, bits, group_size), ...] -> int32 (S, 6) rows [k_start, k_len, bits, g, qrow, srow]."""
    rows, k, qrow, srow = [], 0, 0, 0
    for k_len, bits, g in spec:
        if bits not in PLANES:
            raise ValueError(f"bit width {bits} not in {sorted(PLANES)}")
        if k_len <= 0 or k_len % BLOCK or not valid_group_size(g, k_len):
            raise ValueError(f"segment length {k_len} must be a positive multiple of 64 and of the group "
                             f"size {g} (32 or a multiple of 64)")
        rows.append([k, k_len, bits, g, qrow, srow])
        k, qrow, srow = k + k_len, qrow + k_len * bits // 32, srow + k_len // g
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 6)


@dataclass
class QuantizedTensor:
    qweight: torch.Tensor  # int32 (R, N), K-major bit planes
    scales: torch.Tensor  # fp16 (G, N)
    qzeros: torch.Tensor | None  # uint8 (G, N); None = symmetric, zero 2^(b-1)
    perm: torch.Tensor | None  # int32 (K,): x <- x[..., perm] (after the rotation)
    had: int  # Hadamard block size h, 0 = none
    segments: torch.Tensor  # int32 (S, 6), see make_segments
    bias: torch.Tensor | None  # (N,)
    in_features: int
    out_features: int

    def to(self, device: torch.device | str) -> QuantizedTensor:
        mv = lambda t: None if t is None else t.to(device)
        return replace(self, qweight=mv(self.qweight), scales=mv(self.scales), qzeros=mv(self.qzeros),
                       perm=mv(self.perm), segments=mv(self.segments), bias=mv(self.bias))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored pieces by short name (only those present)."""
        out = {"qweight": self.qweight, "scales": self.scales, "segments": self.segments}
        if self.qzeros is not None:
            out["qzeros"] = self.qzeros
        if self.perm is not None:
            out["perm"] = self.perm
        if self.had:
            out["had"] = torch.tensor(self.had, dtype=torch.int32)
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors named `{prefix}.qweight` etc., as stored in the safetensors files."""
        return {f"{prefix}.{k}": v for k, v in self.tensors().items()}

    @classmethod
    def from_state_dict(cls, prefix: str, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        return _from_pieces(prefix, tensors)

    def stored_bits(self) -> int:
        """Every stored bit of the linear (qweight, scales, qzeros, perm, segments, had); the bias is not
        counted (docs/format.md, "Bits per weight")."""
        return sum(t.numel() * t.element_size() * 8 for k, t in self.tensors().items() if k != "bias")

    def bpw(self) -> float:
        return self.stored_bits() / (self.in_features * self.out_features)


def _segment_list(segments: torch.Tensor) -> list[list[int]]:
    return segments.cpu().tolist()


def _slots3() -> tuple[torch.Tensor, torch.Tensor]:
    """The 3-bit plane: a block of 64 takes 6 rows; row t holds in its low half five fields (bits 3j, j < 5)
    with inputs 6j + t (0..29) and in its high half (bits 16 + 3j) inputs 6j + t + 32, as a power-of-two
    plane of r = 6 rows would. Bit u of input 30 + t' (t' < 2) sits in bit 15 of row 2u + t', bit u of
    input 62 + t' in its bit 31. -> the (6, 5) low-half inputs and the 5 field shifts."""
    return torch.arange(5).view(1, 5) * 6 + torch.arange(6).view(6, 1), torch.arange(5) * 3


def _pack3(c: torch.Tensor) -> torch.Tensor:
    """c (N, L) values < 8 -> int32 (L*3/32, N), the 3-bit plane (_slots3)."""
    N, L = c.shape
    c = c.to(torch.int64).reshape(N, L // BLOCK, 1, BLOCK)  # (N, B, 1, 64)
    e, sh = (t.to(c.device) for t in _slots3())
    lo = (c[..., e] << sh).sum(-1)  # (N, B, 6): disjoint fields, so sum == or
    hi = (c[..., e + 32] << (sh + 16)).sum(-1)
    u, t = torch.arange(6, device=c.device) // 2, torch.arange(6, device=c.device) % 2
    spare = ((c[..., 30 + t] >> u) & 1) << 15 | ((c[..., 62 + t] >> u) & 1) << 31
    words = (lo | hi | spare).reshape(N, -1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.T.contiguous().to(torch.int32)


def _unpack3(w: torch.Tensor) -> torch.Tensor:
    """int32 (L*3/32, N) -> (N, L) int32 values; inverse of _pack3."""
    n_rows, N = w.shape
    w = (w.to(torch.int64) & 0xFFFFFFFF).T.reshape(N, n_rows // 6, 6, 1)  # (N, B, r, 1)
    e, sh = _slots3()
    out = torch.zeros(N, n_rows // 6, BLOCK, dtype=torch.int64, device=w.device)
    out[..., e.to(w.device)] = (w >> sh.to(w.device)) & 7
    out[..., e.to(w.device) + 32] = (w >> (sh.to(w.device) + 16)) & 7
    u = torch.arange(3, device=w.device)
    for t in range(2):
        rows = w[:, :, t::2, 0]  # (N, B, 3): rows 2u + t
        out[..., 30 + t] = (((rows >> 15) & 1) << u).sum(-1)
        out[..., 62 + t] = (((rows >> 31) & 1) << u).sum(-1)
    return out.reshape(N, -1).to(torch.int32)


def _pack_plane(c: torch.Tensor, p: int) -> torch.Tensor:
    """c (N, L) values < 2^p -> int32 (L*p/32, N). Slot j of row t of block B holds input B*64 + j*r + t
    (p = 3: _pack3)."""
    if p == 3:
        return _pack3(c)
    N, L = c.shape
    v, r = 32 // p, 2 * p
    c = c.to(torch.int64).reshape(N, L // BLOCK, v, r)  # (N, B, j, t)
    shifts = (torch.arange(v, dtype=torch.int64) * p).view(1, 1, v, 1)
    words = (c << shifts).sum(dim=2)  # (N, B, r): disjoint bit fields, so sum == or
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.reshape(N, -1).T.contiguous().to(torch.int32)  # (B*r, N)


def _unpack_plane(w: torch.Tensor, p: int) -> torch.Tensor:
    """int32 (L*p/32, N) -> (N, L) int32 plane values; inverse of _pack_plane."""
    if p == 3:
        return _unpack3(w)
    v, r = 32 // p, 2 * p
    n_rows, N = w.shape
    w = (w.to(torch.int64) & 0xFFFFFFFF).reshape(n_rows // r, 1, r, N)  # (B, 1, t, N)
    shifts = (torch.arange(v, dtype=torch.int64, device=w.device) * p).view(1, v, 1, 1)
    vals = (w >> shifts) & ((1 << p) - 1)  # (B, j, t, N): row-major is input order
    return vals.reshape(-1, N).T.to(torch.int32)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
         segments: list[tuple[int, int, int]], perm: torch.Tensor | None = None, had: int = 0,
         bias: torch.Tensor | None = None) -> QuantizedTensor:
    """Pack codes q (N, K) (unsigned, permuted input order) with scales (G, N) and zeros (G, N) | None."""
    N, K = q.shape
    seg = make_segments(segments)
    if int(seg[:, 1].sum()) != K:
        raise ValueError(f"segments cover {int(seg[:, 1].sum())} inputs, q has {K}")
    G = int((seg[:, 1] // seg[:, 3]).sum())
    if scales.shape != (G, N) or (zeros is not None and zeros.shape != (G, N)):
        raise ValueError(f"scales/zeros must be ({G}, {N}), got {tuple(scales.shape)}")
    words = []
    for k0, k_len, bits, _g, _qr, _sr in _segment_list(seg):
        c = q[:, k0:k0 + k_len].to(torch.int64).cpu()
        if int(c.min()) < 0 or int(c.max()) >= 1 << bits:
            raise ValueError(f"codes of segment at k={k0} do not fit in {bits} bits")
        shift = 0
        for p in PLANES[bits]:
            words.append(_pack_plane((c >> shift) & ((1 << p) - 1), p))
            shift += p
    if zeros is not None and (int(zeros.min()) < 0 or int(zeros.max()) > 255):
        raise ValueError("zero points must fit in uint8")
    return QuantizedTensor(
        qweight=torch.cat(words, 0).to(q.device), scales=scales.to(torch.float16),
        qzeros=None if zeros is None else zeros.to(torch.uint8),
        perm=None if perm is None else perm.to(torch.int32), had=int(had), segments=seg,
        bias=bias, in_features=K, out_features=N)


def _segment_codes(words: torch.Tensor, k_len: int, planes: tuple[int, ...]) -> torch.Tensor:
    """A segment's rows of qweight (k_len * bits / 32, N), stored as `planes` -> (N, k_len) int32 codes."""
    code, shift, row = None, 0, 0
    for p in planes:
        n_rows = k_len * p // 32
        plane = _unpack_plane(words[row:row + n_rows], p)
        code = plane if code is None else code | (plane << shift)
        shift, row = shift + p, row + n_rows
    return code


def unpack_codes(qt: QuantizedTensor, planes: dict[int, tuple[int, ...]] = PLANES) -> torch.Tensor:
    """(N, K) int32 codes in permuted input order (`planes`: PLANES_V1 for a version 1 qweight)."""
    return torch.cat([_segment_codes(qt.qweight[qrow:qrow + k_len * bits // 32], k_len, planes[bits])
                      for _k0, k_len, bits, _g, qrow, _sr in _segment_list(qt.segments)], 1)


def upgrade(qt: QuantizedTensor, version: int, chunk: int = 4096) -> QuantizedTensor:
    """A QuantizedTensor read from a file of format `version` -> the current layout: version 1's 3-bit
    segments (a 2-bit and a 1-bit plane) are repacked as the 3-bit plane, in place of the same rows, `chunk`
    output columns at a time (bounded temporary memory for large matrices), on qt's device."""
    segs = _segment_list(qt.segments)
    if version == FORMAT_VERSION or not any(b == 3 for _k, _l, b, *_ in segs):
        return qt
    qweight = qt.qweight.clone()
    for _k0, k_len, bits, _g, qrow, _sr in segs:
        if bits != 3:
            continue
        rows = slice(qrow, qrow + k_len * 3 // 32)
        for c in range(0, qt.out_features, chunk):
            cols = slice(c, c + chunk)
            qweight[rows, cols] = _pack3(_segment_codes(qweight[rows, cols], k_len, PLANES_V1[3]))
    return replace(qt, qweight=qweight)


def group_rows(qt: QuantizedTensor) -> torch.Tensor:
    """(K,) int64: row of `scales` / `qzeros` for each permuted input k."""
    parts = [srow + torch.arange(k_len) // g for _k, k_len, _b, g, _q, srow in _segment_list(qt.segments)]
    return torch.cat(parts).to(qt.scales.device)


def input_bits(qt: QuantizedTensor) -> torch.Tensor:
    """(K,) int64: bit width of each permuted input k."""
    return torch.cat([torch.full((k_len,), b) for _k, k_len, b, *_ in _segment_list(qt.segments)])


def centered_codes(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) q - z in permuted input order (zero 2^(b-1) when symmetric): the stored weight over its scale."""
    q = unpack_codes(qt).to(dtype)
    if qt.qzeros is not None:
        return q - qt.qzeros.to(dtype)[group_rows(qt)].T
    return q - (2.0 ** (input_bits(qt).to(q.device) - 1)).to(dtype)[None, :]


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W (N, K) in the original input order such that the layer computes x @ W.T.

    Wq (permuted, rotated) -> undo perm: Wr[:, perm[i]] = Wq[:, i] -> undo rotation: W = Wr @ H (the
    stored weight approximates W H and H H = I). Math in float32 (float64 if asked), cast to dtype."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    wq = centered_codes(qt, cdt) * qt.scales.to(cdt)[group_rows(qt)].T  # (N, K)
    if qt.perm is not None:
        w = torch.empty_like(wq)
        w[:, qt.perm.long()] = wq
        wq = w
    return block_hadamard(wq, qt.had).to(dtype)


def _piece(prefix: str, name: str, tensors: dict, dtype: torch.dtype, shape: tuple | None,
           required: bool = True) -> torch.Tensor | None:
    key = f"{prefix}.{name}"
    t = tensors.get(key)
    if t is None:
        if required:
            raise WeightsError(f"quantized tensor {key} is missing: the checkpoint is incomplete or not an "
                               f"ember-quantized model")
        return None
    if t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
        raise WeightsError(f"quantized tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} "
                           f"{shape if shape is not None else ''}: the file does not match format version "
                           f"{FORMAT_VERSION}")
    return t


def _from_pieces(prefix: str, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
    """Strict load: every piece present with the dtype and shape implied by `segments`."""
    unknown = [k for k in tensors if k.startswith(prefix + ".") and k[len(prefix) + 1:].count(".") == 0
               and k[len(prefix) + 1:] not in PIECES]
    if unknown:
        raise WeightsError(f"unexpected quantized tensor(s) {unknown} (known pieces: {PIECES})")
    seg_t = _piece(prefix, "segments", tensors, torch.int32, None)
    qw = _piece(prefix, "qweight", tensors, torch.int32, None)
    if seg_t.dim() != 2 or seg_t.shape[1] != 6 or qw.dim() != 2:
        raise WeightsError(f"{prefix}.segments must be int32 (S, 6) and {prefix}.qweight 2-D")
    try:  # rebuilding from the spec checks widths, lengths, group sizes and the derived offsets
        spec = [(kl, b, g) for _k, kl, b, g, _q, _s in _segment_list(seg_t)]
        ok = torch.equal(make_segments(spec), seg_t.cpu())
    except ValueError as e:
        raise WeightsError(f"{prefix}.segments is invalid: {e}") from None
    if not ok:
        raise WeightsError(f"{prefix}.segments offsets (k_start/qrow/srow) are inconsistent")
    K, N = sum(s[0] for s in spec), qw.shape[1]
    R, G = sum(s[0] * s[1] // 32 for s in spec), sum(s[0] // s[2] for s in spec)
    _piece(prefix, "qweight", tensors, torch.int32, (R, N))
    scales = _piece(prefix, "scales", tensors, torch.float16, (G, N))
    qzeros = _piece(prefix, "qzeros", tensors, torch.uint8, (G, N), required=False)
    perm = _piece(prefix, "perm", tensors, torch.int32, (K,), required=False)
    had_t = _piece(prefix, "had", tensors, torch.int32, (), required=False)
    bias = tensors.get(f"{prefix}.bias")
    if bias is not None and tuple(bias.shape) != (N,):
        raise WeightsError(f"{prefix}.bias has shape {tuple(bias.shape)}, expected ({N},)")
    if perm is not None and not torch.equal(perm.long().sort().values.cpu(), torch.arange(K)):
        raise WeightsError(f"{prefix}.perm is not a permutation of 0..{K - 1}")
    had = 0 if had_t is None else int(had_t)
    if had and (had & (had - 1) or K % had):
        raise WeightsError(f"{prefix}.had = {had} must be a power of two dividing in_features {K}")
    return QuantizedTensor(qweight=qw, scales=scales, qzeros=qzeros, perm=perm, had=had, segments=seg_t,
                           bias=bias, in_features=K, out_features=N)


def write_manifest(path: str | Path, manifest: dict) -> None:
    """Write ember_quant.json (path: the file or its folder); format name and version are set here."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **{k: v for k, v in manifest.items()
                                                                  if k not in ("format", "version")}}
    path.write_text(json.dumps(data, indent=1) + "\n")


def read_manifest(path: str | Path) -> dict:
    """Read and check ember_quant.json: the format name and a known version, else WeightsError."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"no quantization manifest at {path}: is this an ember-quantized folder?") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e}): the converted model is corrupt, convert again") from None
    if data.get("format") != FORMAT_NAME:
        raise WeightsError(f"{path}: format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    if data.get("version") not in READS_VERSIONS:
        raise WeightsError(f"{path}: format version {data.get('version')!r} is not supported by this ember "
                           f"(it reads versions {READS_VERSIONS}); convert the model again or upgrade ember")
    return data
