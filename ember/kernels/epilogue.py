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
    glu: y is [gate | up] (N = 2I): the output is silu(gate) * up, (M, I).
    Then, for the next matrix that reads the output (its input layout, QuantLinear.input_layout), before the
    output is rounded: rotate > 0: block_hadamard of that size; perm (K,) int32: the output comes out in that
    matrix's permuted input order, out[:, k] = value[:, perm[k]] (inv_perm, its inverse, is what the kernel's
    store uses). The next matrix is then called with x_ready, so it spends no launch on either.
    x_ready (about this matmul's input): x is already rotated and permuted for this matrix by the producer's
    epilogue above."""
    rms_in: torch.Tensor | None = None
    eps: float = 0.0
    residual: torch.Tensor | None = None
    gamma: torch.Tensor | None = None
    rms_out: torch.Tensor | None = None
    glu: bool = False
    rotate: int = 0
    perm: torch.Tensor | None = None
    inv_perm: torch.Tensor | None = None
    x_ready: bool = False

    @property
    def reorders(self) -> bool:
        """Whether the output is rotated or permuted for the next matrix."""
        return self.rotate > 0 or self.perm is not None
