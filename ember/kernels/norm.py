"""RMSNorm and fused residual-add + RMSNorm: one program per row, statistics in float32."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.kernels import pdl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                     stride_x, stride_r, stride_o, stride_ro,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to the activation dtype first, as the reference does, so the stored residual and
        # the normalized value agree bit for bit with the unfused path.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (xf * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out=None,
            residual_out=None):
    assert x.stride(-1) == 1 and weight.is_contiguous(), "rms_norm: rows must be contiguous"
    h = x.shape[-1]
    x2 = x.reshape(-1, h)  # (T, H); a view when rows are evenly strided
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if out is None else out.view(x2.shape)
    if residual is None:
        res_out = out
    else:
        res_out = torch.empty_like(out) if residual_out is None else residual_out.view(x2.shape)
    r2 = residual.reshape(-1, h) if residual is not None else x2
    assert r2.stride(-1) == 1
    block = triton.next_power_of_2(h)
    warps = min(max(block // 512, 1), 16)  # about 4 elements per thread per 128-bit load
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out, h, eps,
            x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps, **pdl.launch_kwargs(x.device))
    return out.view(x.shape), res_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """x: (T, H), weight: (H,) -> (T, H) in x's dtype (written into `out` when given)."""
    return _launch(x, None, weight, eps, out)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None):
    """Returns (rms_norm(x + residual), x + residual), both new tensors of x's dtype unless given (out,
    residual_out); the inputs are unchanged."""
    assert residual.shape == x.shape and residual.dtype == x.dtype
    return _launch(x, residual, weight, eps, out, residual_out)
