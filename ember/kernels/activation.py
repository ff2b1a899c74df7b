"""SiLU-and-multiply of the fused gate/up projection output."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels import pdl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: (T, 2I) = [gate | up] -> silu(gate) * up: (T, I), math in float32."""
    assert x.stride(-1) == 1 and x.shape[-1] % 2 == 0, "silu_and_mul: rows must be contiguous, width even"
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        out = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    out = out.view(x2.shape[0], inter)
    block = min(triton.next_power_of_2(inter), 2048)
    if x2.shape[0] > 0:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out, inter, x2.stride(0), out.stride(0), BLOCK=block, num_warps=4, **pdl.launch_kwargs(x.device))
    return out.view(*x.shape[:-1], inter)
