"""Where the batch-1 quantized GEMV's time goes: fixed cost per launch against streaming rate.

For 4096 output columns and K from 2048 to 28672 inputs (and the wide 4096 x 28672), at each width, times the
one-row qmatmul as bench_qmatmul.py does (a CUDA graph over weight copies, so L2 never holds them) and fits
time = fixed + bytes / rate over the K series. Each arm is an environment read by make_plan or at launch
(e.g. EMBER_UNIFORM=0 / 1), set in this process before its plans are built. The arm PROBE_NOREDUCE=1 is this
script's own diagnostic: every split stores its partial sums straight to the output (the sums are wrong), so
its fixed cost against the default arm's is what the split-K reduction and drain cost.

  PYTHONPATH=. python3 scripts/probe_gemv_fixed.py [--widths 4,2] [--arms EMBER_UNIFORM=0,EMBER_UNIFORM=1]
"""
from __future__ import annotations

import argparse
import os

import torch

from ember.kernels import qmatmul as qm
from scripts.bench_qmatmul import bench_one, copy_bandwidth

KS = [2048, 4096, 8192, 14336, 28672]


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x -> (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


class _NoReduce:
    """Stands in for qmatmul_kernel while PROBE_NOREDUCE=1: launches it with ATOMIC=False."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kw):
            if os.environ.get("PROBE_NOREDUCE") == "1":
                kw = dict(kw, ATOMIC=False, EPI_EARLY=False)
            return self.kernel[grid](*args, **kw)
        return launch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="4,2")
    ap.add_argument("--arms", default="EMBER_UNIFORM=0,EMBER_UNIFORM=1", help="comma-separated VAR=value arms")
    a = ap.parse_args()
    qm.qmatmul_kernel = _NoReduce(qm.qmatmul_kernel)
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    for arm in a.arms.split(","):
        var, val = arm.split("=")
        os.environ[var] = val
        for w in (int(v) for v in a.widths.split(",")):
            xs, ys = [], []
            for K in KS:
                t, moved = bench_one(K, 4096, w, 1)
                xs.append(moved)
                ys.append(t)
                print(f"{arm} {w} bits {K:>5} x 4096: {t * 1e6:6.2f} us, {moved / 1e6:5.1f} MB, "
                      f"{100 * moved / t / copy_bw:5.1f}% of copy", flush=True)
            fixed, per_byte = fit(xs, ys)
            print(f"{arm} {w} bits, N=4096: fixed {fixed * 1e6:.2f} us + bytes at {1 / per_byte / 1e9:.0f} GB/s "
                  f"({100 / per_byte / copy_bw:.0f}% of copy)", flush=True)
            t, moved = bench_one(4096, 28672, w, 1)
            print(f"{arm} {w} bits 4096 x 28672: {t * 1e6:6.2f} us, {100 * moved / t / copy_bw:5.1f}% of copy",
                  flush=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
