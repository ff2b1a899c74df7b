"""Block Hadamard rotation used by the quantized format (docs/format.md, "Math", step 1).

`hadamard_matrix(h)` is the Sylvester Hadamard matrix of size h (a power of two) scaled by 1/sqrt(h):
symmetric and orthonormal, so H @ H = I. `block_hadamard(x, h)` multiplies every consecutive block of h
entries of the last axis by H (x viewed as (..., K/h, h) times H). Applied twice it is the identity.
"""
from __future__ import annotations

import functools
import math

import torch


def is_power_of_two(h: int) -> bool:
    return h >= 1 and (h & (h - 1)) == 0


@functools.lru_cache(maxsize=32)
def _hadamard_cached(h: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    # Sylvester construction in float64, then one rounding to the requested dtype.
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < h:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return (H / math.sqrt(h)).to(dtype=dtype, device=device)


def hadamard_matrix(h: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix (h, h). h must be a power of two."""
    if not is_power_of_two(h):
        raise ValueError(f"Hadamard size must be a power of two, got {h}")
    return _hadamard_cached(h, dtype, str(torch.device(device)))


def block_hadamard(x: torch.Tensor, h: int) -> torch.Tensor:
    """x (..., K) -> x (..., K) with each block of h along the last axis multiplied by H_h.

    Computed in float32 for 16-bit inputs (float64 stays float64), returned in x's dtype."""
    K = x.shape[-1]
    if h == 0:
        return x
    if K % h != 0:
        raise ValueError(f"last axis {K} is not a multiple of the Hadamard size {h}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    H = hadamard_matrix(h, cdt, x.device)
    y = x.to(cdt).reshape(*x.shape[:-1], K // h, h) @ H  # (..., K/h, h)
    return y.reshape(x.shape).to(x.dtype)
