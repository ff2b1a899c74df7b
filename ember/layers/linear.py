"""Dense 16-bit linear layer. Quantized layers (layers/quant_linear.py) replace it at load time with the
same forward contract: (..., in_features) -> (..., out_features)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b). W: (out_features, in_features). Fused projections (qkv, gate_up) are one Linear
    whose rows are the concatenated HF matrices; `shards` records how (HF suffixes, row counts)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shards: tuple[tuple[str, int], ...] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.shards = shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"
