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
        self.fp8_prefill = False  # many-row matmuls on fp8 tensor cores where the matrix allows (set_fp8_prefill)

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

            self._plan = make_plan(self.qt, fp8=self.fp8_prefill)

    def takes_rounded_input(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether `rows` rows of input would run on the FP8 path, so a producer may hand them over already
        rounded to e4m3 (forward_rounded): CUDA, 16-bit activations, no input rotation."""
        if not (self.fp8_prefill and self.qweight.is_cuda and dtype in (torch.float16, torch.bfloat16)
                and self.had == 0):
            return False
        from ember.kernels.qmatmul import takes_fp8

        self.prepare()
        return takes_fp8(self._plan, rows)

    def fuses_glu(self, x: torch.Tensor) -> bool:
        """Whether forward(x, Epilogue(glu=True)) does the SiLU-and-multiply inside the matmul (qmatmul.fuses_glu:
        prompts through the fused dequantize-GEMM), so the MLP should ask for it instead of a separate pass."""
        if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
            return False
        from ember.kernels.qmatmul import fuses_glu

        self.prepare()
        return fuses_glu(self._plan, self.qt, x)

    def forward_rounded(self, a8: torch.Tensor, sa: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """(rows, N) in dtype from input already rounded by qmatmul_fp8.quantize_act: a8 (MP, K) e4m3 in
        permuted input order, sa (K/128, MP) its scales."""
        from ember.kernels.qmatmul_fp8 import matmul_rounded

        out = torch.empty((rows, self.out_features), dtype=dtype, device=a8.device)
        matmul_rounded(a8, sa, rows, self.qt, self._plan.fp8, out)
        if self.bias is not None:
            out += self.bias.to(dtype)
        return out

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


def set_fp8_prefill(model: nn.Module, on: bool) -> tuple[int, int]:
    """Switch every QuantLinear of model to (or off) the FP8 many-row path (kernels/qmatmul_fp8.py); plans are
    rebuilt at next use (before any graph capture). Returns (linears that can take it, quantized linears)."""
    from ember.kernels.qmatmul_fp8 import fp8_reason

    able = total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += 1
            able += fp8_reason(m.qt) is None
            m.fp8_prefill, m._plan = on, None
    return able, total
