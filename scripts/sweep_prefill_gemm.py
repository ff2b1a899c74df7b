"""Prefill-sized quantized matmuls: dequantize + cuBLAS (today's path above 64 rows) against the fused Triton
dequant-GEMM ("large" dot mode) over a grid of tiles, on the Llama-3-8B shapes. Prints per shape the best
configuration and the time of one decoder layer's four matmuls each way.

  PYTHONPATH=. python3 scripts/sweep_prefill_gemm.py [--rows 512,2048] [--width 4] [--quick]

A graphed 512-token prefill of the 8B shape spent 6.9 of 18.4 ms dequantizing weights to fp16 for cuBLAS
(docs/benchmarks.md); this measures whether the fused kernel can win that back.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from ember.kernels.qmatmul import make_plan, qmatmul
from scripts.bench_qmatmul import LAYER, graph_time, random_qt


def configs(quick: bool):
    # (block_m, block_n, warps, stages, programs per SM); programs per SM 0 = one K split per segment (no
    # atomics), 1 = split K until the grid has about one program per SM (M=512 gives few row blocks)
    if quick:
        yield from ((256, 128, 8, 3, 0), (256, 128, 8, 3, 1), (128, 128, 8, 3, 0), (128, 256, 8, 3, 0))
        return
    for bm, bn, warps, stages, per_sm in itertools.product((128, 256), (128, 256), (8,), (3, 4), (0, 1)):
        if bm * bn > 256 * 128:
            continue  # the fp32 accumulator does not fit the registers
        yield bm, bn, warps, stages, per_sm


def timed(x, qts, outs, plans) -> float:
    """Seconds per matmul, over a CUDA graph running each weight copy once (no L2 reuse)."""
    fns = [lambda q=q, p=p, o=o: qmatmul(x, q, out=o, plan=p) for q, p, o in zip(qts, plans, outs)]
    return graph_time(fns, reps=7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="512,2048")
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    a = ap.parse_args()
    rows_out, summary = [], {}
    for M in (int(v) for v in a.rows.split(",")):
        layer_deq = layer_dot = 0.0
        for K, N in LAYER:
            copies = max(2, min(6, (400 << 20) // (K * N * a.width // 8)))
            qts = [random_qt(K, N, a.width) for _ in range(copies)]
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            outs = [torch.empty(M, N, device="cuda", dtype=torch.float16) for _ in qts]
            t_deq = timed(x, qts, outs, [make_plan(q, large_mode="dequant") for q in qts])
            best = (float("inf"), None)
            for bm, bn, warps, stages, per_sm in configs(a.quick):
                try:
                    plans = [make_plan(q, configs={"large": (bn, warps, stages, per_sm, bm)}, large_mode="dot")
                             for q in qts]
                    t = timed(x, qts, outs, plans)
                except Exception as e:  # noqa: BLE001 (a config that does not compile or fit is skipped)
                    print(f"  skip {(bm, bn, warps, stages, per_sm)}: {type(e).__name__}", flush=True)
                    continue
                rows_out.append({"M": M, "K": K, "N": N, "cfg": [bm, bn, warps, stages, per_sm], "us": t * 1e6,
                                 "dequant_us": t_deq * 1e6})
                print(f"  M={M} {K}x{N} {(bm, bn, warps, stages, per_sm)}: {t * 1e6:.1f} us", flush=True)
                best = min(best, (t, (bm, bn, warps, stages, per_sm)))
            tflops = 2 * M * K * N / 1e12
            print(f"M={M} {K}x{N}: dequant+cuBLAS {t_deq * 1e6:.1f} us ({tflops / t_deq:.0f} TFLOP/s), "
                  f"fused best {best[0] * 1e6:.1f} us ({tflops / best[0]:.0f} TFLOP/s) at {best[1]}", flush=True)
            layer_deq += t_deq
            layer_dot += min(best[0], t_deq)
            summary[f"{M}:{K}x{N}"] = {"dequant_us": t_deq * 1e6, "fused_us": best[0] * 1e6, "cfg": best[1]}
            del qts, outs
        print(f"M={M}: one layer's matmuls: dequant+cuBLAS {layer_deq * 1e3:.3f} ms, best per shape "
              f"{layer_dot * 1e3:.3f} ms", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sweep_prefill_gemm.json"), "w") as f:
            json.dump({"rows": rows_out, "summary": summary}, f)


if __name__ == "__main__":
    main()
