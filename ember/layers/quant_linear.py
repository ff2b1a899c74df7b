"""A linear layer whose weight is stored in the ember quantized format (docs/format.md).

On CUDA with fp16/bf16 activations, forward runs the Triton kernels (ember/kernels/qmatmul.py) with a
launch plan built once (call `prepare()` before capturing CUDA graphs). Elsewhere it is the reference
`x @ dequantize(qt).T`, with the dequantized weight cached per dtype (the CPU fallback; costs N*K*itemsize
bytes)."""
from __future__ import annotations

import torch
from torch import nn

from ember.quant.format import QuantizedTensor, dequantize


class QuantLinear(nn.Module):
    def __init__(self, qt: QuantizedTensor):
        super().__init__()
        self.in_features, self.out_features, self.had = qt.in_features, qt.out_features, qt.had
        self.register_buffer("qweight", qt.qweight)
        self.register_buffer("scales", qt.scales)
        self.register_buffer("qzeros", qt.qzeros)
        self.register_buffer("perm", qt.perm)
        self.register_buffer("segments", qt.segments)
        self.register_buffer("bias", qt.bias)
        self._dense: dict[torch.dtype, torch.Tensor] = {}  # CPU fallback cache
        self._plan = None  # kernel launch plan (CUDA), built on first use

    @property
    def qt(self) -> QuantizedTensor:
        return QuantizedTensor(qweight=self.qweight, scales=self.scales, qzeros=self.qzeros, perm=self.perm,
                               had=self.had, segments=self.segments, bias=self.bias,
                               in_features=self.in_features, out_features=self.out_features)

    def _apply(self, fn, recurse=True):
        # Moving / casting the module invalidates what was derived from the buffers.
        self._dense, self._plan = {}, None
        return super()._apply(fn, recurse)

    def prepare(self) -> None:
        """Build the kernel plan now (call before capturing CUDA graphs)."""
        if self.qweight.is_cuda and self._plan is None:
            from ember.kernels.qmatmul import make_plan

            self._plan = make_plan(self.qt)

    def forward(self, x: torch.Tensor, epi=None) -> torch.Tensor:
        """x: (..., K) -> (..., N); with epi (kernels/epilogue.py) the fused epilogue's output, x (T, K)."""
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            from ember.kernels.qmatmul import qmatmul

            self.prepare()
            return qmatmul(x, self.qt, plan=self._plan, epi=epi)
        w = self._dense.get(x.dtype)
        if w is None:
            w = self._dense[x.dtype] = dequantize(self.qt, x.dtype)  # (N, K)
        y = x @ w.T
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if epi is None:
            return y
        from ember.kernels.reference import matmul_epilogue

        return matmul_epilogue(y.float(), epi, x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, had={self.had}"
