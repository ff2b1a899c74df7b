"""Programmatic dependent launch (PDL, Hopper and newer): lets a kernel start while the one before it in the
stream is still finishing, so launch latency and the start of its own work (in the quantized matmul: loading
its first weight tile, which no earlier kernel writes) overlap the previous kernel's tail.

Contract for every kernel launched with `launch_kwargs(device)`: it calls `wait(PDL)` before its first read
of anything an earlier kernel writes and before its first global write; only immutable data (weights,
scales, split metadata) may be read before. `wait` returns once the preceding kernel has completed and its
writes are visible; since that kernel waited on its own predecessor, everything earlier is complete too.
`launch_dependents(PDL)` at the top lets the next kernel be scheduled as soon as every program of this one
has started. A decode step of ~300 small kernels spends a large part of its time in these gaps.

EMBER_PDL=0 turns it off (the launches then behave as ordinary ones), 1 or 2 choose the variant (`mode`);
read at the first launch; it is never on under the interpreter or before sm_90."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def _mode(device_type: str, index: int | None) -> int:
    want = int(os.environ.get("EMBER_PDL", "2"))
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or want == 0 or device_type != "cuda":
        return 0
    index = torch.cuda.current_device() if index is None else index
    return want if torch.cuda.get_device_capability(index)[0] >= 9 else 0


def mode(device: torch.device) -> int:
    """0: off; 1: every kernel waits at its start; 2 (default): the one-row quantized matmul first loads its
    first weight tile, then waits (qmatmul._pdl_kwargs), and the rope-fused decode attention reads its
    metadata and first cached block first (attention_decode.early). H100, Llama-3-8B 4-bit decode: 340.3 /
    351.6 / 355.8 tok/s for 0 / 1 / 2 (second round).
    Read once per device (it is asked on every launch, and eager prefill is bound by the host)."""
    return _mode(device.type, device.index)


def launch_kwargs(device: torch.device) -> dict:
    """Extra launch arguments: {"launch_pdl": True, "PDL": mode} when on, else {"PDL": 0}."""
    m = mode(device)
    return {"launch_pdl": True, "PDL": m} if m else {"PDL": 0}


# Under the interpreter the PDL instructions are no-ops, so that tests can run a kernel's PDL-2 code path
# (work peeled off before the wait) on CPU with PDL forced on.
ON_GPU = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def wait(PDL: tl.constexpr):
    if PDL and ON_GPU:
        gdc_wait()


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    if PDL and ON_GPU:
        gdc_launch_dependents()
