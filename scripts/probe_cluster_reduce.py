"""Offline sm_90 check, no GPU needed: can this Triton sum partial results across the CTAs of a thread-block
cluster on chip (distributed shared memory), the reduction the one-row matmul's split-K would need to drop its
global-memory atomics, fence, counter and read-back (docs/dev/qmatmul-notes.md, seventeenth session)?

It compiles a Gluon kernel launched as clusters of C CTAs (num_ctas=C): a (C, BN) fp32 tile whose row r lives in
CTA r, a convert_layout to a layout in which the CTAs split the columns instead, then a sum over the rows.
Prints whether each lowering compiled and, if so, the SASS lines of the exchange (STS into the CTA's own shared
memory, the cluster barrier UCGABAR_*, loads from the other CTAs' shared memory).

    PYTHONPATH=. .venv/bin/python scripts/probe_cluster_reduce.py [--ctas 2,4]
    PYTHONPATH=/tmp/t36site:. .venv/bin/python scripts/probe_cluster_reduce.py   # the device's Triton 3.6

(/tmp/t36site: the triton==3.6.0 wheel unzipped, as scripts/sass_check.py describes.)"""
from __future__ import annotations

import argparse
import os
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

from scripts.sass_check import disassemble

BN = 256
SASS_OPS = ("STS", "LDS", "LD.E", "UCGABAR", "MEMBAR", "FADD", "STG", "LDG")


@gluon.jit
def cluster_sum_kernel(x_ptr, out_ptr, N, C: gl.constexpr, BN: gl.constexpr, ROWS_CGA: gl.constexpr,
                       COLS_CGA: gl.constexpr):
    """out (BN,) = x (C, BN).sum(0), x's row r loaded by CTA r of the cluster."""
    rows_split: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32],
                                                warps_per_cta=[1, 2], order=[1, 0], cga_layout=ROWS_CGA.value)
    cols_split: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4 // C], threads_per_warp=[1, 32],
                                                warps_per_cta=[1, 2], order=[1, 0], cga_layout=COLS_CGA.value)
    rows = gl.arange(0, C, layout=gl.SliceLayout(1, rows_split))
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, rows_split))
    x = gl.load(x_ptr + rows[:, None] * N + cols[None, :])
    x = gl.convert_layout(x, cols_split)  # the cross-CTA exchange
    gl.store(out_ptr + gl.arange(0, BN, layout=gl.SliceLayout(0, cols_split)), gl.sum(x, axis=0))


def compile_for(ctas: int) -> str:
    bits = ctas.bit_length() - 1
    const = {"C": ctas, "BN": BN,
             "ROWS_CGA": [[1 << i, 0] for i in range(bits)],  # CTA bases in units of the CTA's own tile
             "COLS_CGA": [[0, 1 << i] for i in range(bits)]}
    sig = {"x_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", **{k: "constexpr" for k in const}}
    k = triton.compile(GluonASTSource(fn=cluster_sum_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 2, "num_ctas": ctas})
    sass, _ = disassemble(k.asm["cubin"])
    return "\n".join(line.strip() for line in sass.splitlines() if any(op in line for op in SASS_OPS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ctas", default="2,4", help="cluster sizes to try (powers of two, default 2,4)")
    args = p.parse_args()
    print(f"triton {triton.__version__}, sm_90, {BN} columns, 2 warps a CTA")
    for c in (int(v) for v in args.ctas.split(",")):
        with tempfile.TemporaryFile(mode="w+") as err:  # MLIR prints its diagnostics to fd 2 itself
            saved = os.dup(2)
            os.dup2(err.fileno(), 2)
            try:
                sass, exc = compile_for(c), None
            except Exception as e:
                sass, exc = "", e
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            err.seek(0)
            errors = [line.strip() for line in err if "error:" in line]
        if exc is None:
            print(f"--- cluster of {c}: compiled\n{sass}")
        else:  # the lowering's first error says what is missing
            print(f"--- cluster of {c}: does not compile ({type(exc).__name__}): {(errors or [repr(exc)])[0][:300]}")


if __name__ == "__main__":
    main()
