"""What a quantized matmul can finish in its store (kernels/qmatmul_kernels.py, `_finish`), so a decode layer
spends no launch on its RMSNorms, residual adds or SwiGLU activation. Plain data, importable without Triton:
the layers build these, the kernels or reference.matmul_epilogue carry them out."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Epilogue:
    """Steps applied to the matmul's fp32 product y (M, N), in this order (reference.matmul_epilogue):
    rms_in (M,) fp32: the input rows were h * gamma of un-normalized rows h whose mean squares these are, so
        y *= rsqrt(rms_in + eps) completes the RMSNorm (it is linear in each row);
    then y is rounded to the activation dtype, as the unfused path stores it;
    residual (M, N) + gamma (N,) + rms_out (M,) fp32: h = y + residual is written back into residual, the
        output is h * gamma (the next RMSNorm's weight) and mean(h^2) of each row is added into rms_out, which
        must be zero before;
    glu: y is [gate | up] (N = 2I): the output is silu(gate) * up, (M, I)."""
    rms_in: torch.Tensor | None = None
    eps: float = 0.0
    residual: torch.Tensor | None = None
    gamma: torch.Tensor | None = None
    rms_out: torch.Tensor | None = None
    glu: bool = False
