"""Convert a GPTQ linear (AutoGPTQ / transformers checkpoints, "v1" zero convention) into the ember format.

GPTQ layout (bits b in {4, 8}, f = 32 / b values per int32 word, low bits first):
  qweight int32 (K/f, N): input k of column n sits at bits b*(k % f) of word [k // f, n] (packed along K);
  qzeros  int32 (G, N/f): zero of column n sits at bits b*(n % f) of word [g, n // f] (packed along N);
          "v1": the stored value is zero - 1, so the real zero is (stored & mask) + 1;
  scales  fp16 (G, N);  g_idx int32 (K,): scale group of each input (act-order makes it non-monotonic);
  W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]).
Act-order becomes our `perm` = stable argsort(g_idx), which makes every group a contiguous run of
group_size inputs; group_size -1 is one group of all K inputs. Symmetric checkpoints (every zero 2^(b-1))
store no qzeros.
"""
from __future__ import annotations

import torch

from ember.errors import WeightsError
from ember.quant.format import QuantizedTensor, pack


def _unpack_along(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> int64 fields, `32/bits` per word expanded along `dim` (low bits first)."""
    f = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(f, dtype=torch.int64, device=words.device) * bits
    if dim == 0:  # (R, N) -> (R, f, N) -> (R*f, N)
        vals = (w[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return vals.reshape(-1, w.shape[1])
    vals = (w[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)  # (G, C, f)
    return vals.reshape(w.shape[0], -1)


def gptq_to_quantized(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor | None, bits: int, group_size: int,
                      bias: torch.Tensor | None = None, name: str = "linear") -> QuantizedTensor:
    """One GPTQ linear -> QuantizedTensor. Raises WeightsError naming `name` on any inconsistency."""
    if bits not in (4, 8):
        raise WeightsError(f"{name}: GPTQ with {bits} bits is not supported (4 and 8 are)")
    f = 32 // bits
    K, N = qweight.shape[0] * f, qweight.shape[1]
    gs = K if group_size == -1 else group_size
    if gs <= 0 or K % gs:
        raise WeightsError(f"{name}: group_size {group_size} does not divide in_features {K}")
    G = K // gs
    for tname, t, shape in (("qweight", qweight, None), ("qzeros", qzeros, (G, N // f)),
                            ("scales", scales, (G, N)), ("g_idx", g_idx, (K,))):
        if t is None:
            continue
        if shape is not None and tuple(t.shape) != shape:
            raise WeightsError(f"{name}.{tname} has shape {tuple(t.shape)}, expected {shape} for a "
                               f"{bits}-bit GPTQ linear with group_size {group_size} ({K} x {N})")
    if K % 64:
        raise WeightsError(f"{name}: in_features {K} is not a multiple of 64, which the ember format needs")
    q = _unpack_along(qweight, bits, 0)  # (K, N) in checkpoint input order
    zeros = _unpack_along(qzeros, bits, 1) + 1  # (G, N), v1 convention
    if int(zeros.max()) > 255:
        raise WeightsError(f"{name}.qzeros holds a zero point of {int(zeros.max())} (a v1 stored value of "
                           f"255), which the ember format (uint8 zeros) cannot represent")
    g = torch.arange(K, device=qweight.device) // gs if g_idx is None else g_idx.to(torch.int64)
    perm = torch.sort(g, stable=True).indices  # (K,): groups become contiguous
    expected = torch.arange(K, device=g.device) // gs
    if not torch.equal(g[perm], expected):
        raise WeightsError(f"{name}.g_idx does not give every group exactly {gs} inputs: not a GPTQ "
                           f"checkpoint with group_size {group_size}")
    identity = torch.equal(perm, torch.arange(K, device=perm.device))
    sym = bool((zeros == (1 << (bits - 1))).all())
    return pack(q[perm].T.contiguous(), scales.to(torch.float16), None if sym else zeros.to(torch.uint8),
                [(K, bits, gs)], perm=None if identity else perm.to(torch.int32), had=0, bias=bias)


def load_gptq_linear(tensors: dict[str, torch.Tensor], prefix: str, bits: int,
                     group_size: int) -> QuantizedTensor:
    """Read `{prefix}.qweight/.qzeros/.scales[/.g_idx][/.bias]` from a checkpoint dict and convert."""
    missing = [k for k in ("qweight", "qzeros", "scales") if f"{prefix}.{k}" not in tensors]
    if missing:
        raise WeightsError(f"GPTQ tensors {[f'{prefix}.{k}' for k in missing]} are missing")
    return gptq_to_quantized(tensors[f"{prefix}.qweight"], tensors[f"{prefix}.qzeros"],
                             tensors[f"{prefix}.scales"], tensors.get(f"{prefix}.g_idx"), bits, group_size,
                             bias=tensors.get(f"{prefix}.bias"), name=prefix)
