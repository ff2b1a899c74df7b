"""Sweep the batch-1 (or, with --mode small, the 2-32 row) qmatmul launch config (block_n, warps, stages,
programs per SM -> K split) on the Llama-3-8B shapes; prints the best config per (shape, width) as TUNED-table
entries.

  PYTHONPATH=. python3 scripts/sweep_qmatmul.py [--widths 4,3,mixed] [--shapes 4096x6144,4096x4096]
  PYTHONPATH=. python3 scripts/sweep_qmatmul.py --mode small --rows 8 --stages 2,3 --per-sm 2,4,8  # 2-32 rows
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from ember.kernels.qmatmul import make_plan, qmatmul
from scripts.bench_qmatmul import SHAPES, graph_time, random_qt

BLOCKS = [(128, 1), (256, 2), (512, 4), (1024, 8), (256, 1), (512, 2), (128, 2), (256, 4)]  # (block_n, warps)
PER_SM = [2, 4, 8, 16]
# the tl.dot path of 2-32 rows ("small" mode, --mode small): block_n x warps
SMALL_BLOCKS = [(64, 4), (128, 4), (64, 2), (128, 8), (256, 8), (32, 2)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="4,3,mixed")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--stages", default="1,3", help="pipelining depths of the one-row loop to try (1 = none)")
    ap.add_argument("--blocks", type=int, default=len(BLOCKS), help="try the first N (block_n, warps) pairs")
    ap.add_argument("--per-sm", default=",".join(map(str, PER_SM)), help="programs per SM to try")
    ap.add_argument("--mode", default="gemv", choices=["gemv", "small"], help="one row, or 2-32 rows (tl.dot)")
    ap.add_argument("--rows", type=int, default=1, help="rows of x (2-32 with --mode small)")
    a = ap.parse_args()
    blocks = SMALL_BLOCKS if a.mode == "small" else BLOCKS
    stages = [int(v) for v in a.stages.split(",")]
    per_sms = [int(v) for v in a.per_sm.split(",")]
    widths = [w if w == "mixed" else int(w) for w in a.widths.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    rows, best = [], {}
    for (K, N), width in itertools.product(shapes, widths):
        n_copies = max(2, min(15, (200 << 20) // (K * N // 2)))
        qts = [random_qt(K, N, width) for _ in range(n_copies)]
        x = torch.randn(a.rows, K, device="cuda", dtype=torch.float16)
        for (bn, warps), st, per_sm in itertools.product(blocks[:a.blocks], stages, per_sms):
            cfg = (bn, warps, st, per_sm)
            plans = [make_plan(qt, configs={a.mode: cfg}) for qt in qts]
            outs = [torch.empty(a.rows, N, device="cuda", dtype=torch.float16) for _ in qts]
            fns = [lambda q=q, p=p, o=o, x=x: qmatmul(x, q, out=o, plan=p) for q, p, o in zip(qts, plans, outs)]
            t = graph_time(fns)  # seconds per matmul
            gbs = qts[0].stored_bits() / 8 / t / 1e9
            rows.append(dict(K=K, N=N, width=str(width), cfg=cfg, splits=plans[0].modes[a.mode].splits, us=t * 1e6,
                             gbs=gbs, mode=a.mode, M=a.rows))
            key = (K, N, str(width))
            if key not in best or t < best[key][0]:
                best[key] = (t, cfg, gbs)
        print(f"{K}x{N} w{width}: best {best[(K, N, str(width))][1]} {best[(K, N, str(width))][0]*1e6:.1f} us "
              f"{best[(K, N, str(width))][2]:.0f} GB/s", flush=True)
        del qts
        if os.environ.get("OUT"):  # after every shape: a timeout keeps what was measured
            with open(os.path.join(os.environ["OUT"], "sweep_qmatmul.json"), "w") as f:
                json.dump(rows, f)
    print("TUNED = {")
    for (K, N, w), (t, cfg, gbs) in best.items():
        print(f"    ({K}, {N}, {w if w != 'mixed' else 0}, '{a.mode}'): {cfg},  # {t*1e6:.1f} us, {gbs:.0f} GB/s")
    print("}")


if __name__ == "__main__":
    main()
