"""Shared set-up of the Triton op tests: kernels in Triton's CPU interpreter when there is no CUDA, the
`device` fixture, and a comparison that names the first mismatch."""
import importlib
import os
import sys

import pytest
import torch

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
KERNEL_MODULES = ["attention_common", "attention_decode", "attention_prefill", "attention", "norm", "rope",
                  "activation", "step"]


def _import_interpreted() -> str | None:
    """Triton fixes interpreter-or-GPU when a function is decorated, its own library included, so without
    CUDA import triton and the kernel modules under TRITON_INTERPRET=1, then restore the variable so other
    test modules see no change. Returns why the kernels cannot run, or None."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language.standard as tl_std
        from triton.runtime.interpreter import InterpretedFunction
        if not isinstance(tl_std.sum, InterpretedFunction):
            return "triton was imported before TRITON_INTERPRET=1 was set (run the kernel tests on their own)"
        for name in KERNEL_MODULES:
            mod = sys.modules.get(f"ember.kernels.{name}")
            importlib.reload(mod) if mod is not None else importlib.import_module(f"ember.kernels.{name}")
        return None
    except ImportError as e:
        return f"no triton: {e}"
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


CANNOT_INTERPRET = None if torch.cuda.is_available() else _import_interpreted()


@pytest.fixture(scope="module", autouse=True)
def device():
    """CUDA when present; otherwise CPU with EMBER_TRITON_CPU=1 while this module's tests run, so that
    ops sends CPU tensors to the (interpreted) kernels."""
    if torch.cuda.is_available():
        yield torch.device("cuda")
        return
    if CANNOT_INTERPRET:
        pytest.skip(CANNOT_INTERPRET)
    os.environ["EMBER_TRITON_CPU"] = "1"  # ops route CPU tensors to the interpreted kernels
    yield torch.device("cpu")
    del os.environ["EMBER_TRITON_CPU"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """Elementwise |a - e| <= tol * (1 + |e|); NaN only where both are NaN. Names the first mismatch."""
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad = ~torch.isclose(a, e, rtol=tol, atol=tol, equal_nan=True)
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {a.numel()} differ; first at {idx}: "
                             f"got {a[idx].item()}, expected {e[idx].item()}")

