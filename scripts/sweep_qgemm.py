"""Prompt-sized 4-bit matmuls on the Llama-3-8B shapes: the fused dequantize-GEMM (kernels/qgemm.py) over its
tile configs, against dequantize + cuBLAS (the path it replaces), cuBLAS alone on 16-bit weights (the
floor of any path that multiplies in 16 bits) and the engine's own choice (qgemm.use_for). Prints per row
count the best config of each shape and one decoder layer's four matmuls each way; one JSON line per timing.
A config is BN,BM,warps,stages[,split].

  PYTHONPATH=. python3 scripts/sweep_qgemm.py [--rows 512,2048] [--configs 128,128,8,3:128,256,8,3] [--dtype fp16] [--dot]
"""
from __future__ import annotations

import argparse
import json

import torch

from ember.kernels import qgemm
from ember.kernels.qmatmul import make_plan, qmatmul
from scripts.bench_qmatmul import LAYER, graph_time, random_qt

NAMES = ["qkv", "o", "gate/up", "down"]
CONFIGS = "64,64,4,4:128,128,8,4:128,128,8,4,2:128,256,8,3:128,256,8,3,2:64,128,4,4:64,256,4,3"  # (.., split)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="512,2048")
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--dot", action="store_true", help="also time qmatmul's large dot mode (the <= 64-row path)")
    a = ap.parse_args()
    dt = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    configs = [tuple(int(v) for v in c.split(",")) for c in a.configs.split(":")]
    for M in (int(v) for v in a.rows.split(",")):
        layer = {"cublas": 0.0, "dequant": 0.0, "dot": 0.0, "best": 0.0, "engine": 0.0}
        per_cfg = {c: 0.0 for c in configs}
        for (K, N), name in zip(LAYER, NAMES):
            copies = max(2, min(8, (400 << 20) // (K * N // 2)))
            qts = [random_qt(K, N, 4) for _ in range(copies)]
            plans = [make_plan(q, large_mode="dequant") for q in qts]
            x = torch.randn(M, K, device="cuda").to(dt)
            outs = [torch.empty(M, N, device="cuda", dtype=dt) for _ in qts]
            w16 = [torch.randn(K, N, device="cuda").to(dt) for _ in range(min(copies, 4))]
            t_cub = graph_time([lambda w=w, o=o, x=x: torch.matmul(x, w, out=o) for w, o in zip(w16, outs)], reps=7)
            del w16
            t_deq = graph_time([lambda q=q, p=p, o=o, x=x: qmatmul(x, q, out=o, plan=p)
                                for q, p, o in zip(qts, plans, outs)], reps=7)
            t_dot = float("nan")
            if a.dot:  # the older many-row Triton kernel (fp32 decode, W through shared memory), qmatmul's <= 64 rows
                dplans = [make_plan(q, large_mode="dot") for q in qts]
                t_dot = graph_time([lambda q=q, p=p, o=o, x=x: qmatmul(x, q, out=o, plan=p)
                                    for q, p, o in zip(qts, dplans, outs)], reps=7)
                del dplans
            # the engine's own choice (qgemm.use_for / pick_config, else dequantize + cuBLAS)
            aplans = [make_plan(q) for q in qts]
            t_auto = graph_time([lambda q=q, p=p, o=o, x=x: qmatmul(x, q, out=o, plan=p)
                                 for q, p, o in zip(qts, aplans, outs)], reps=7)
            del aplans
            ref = qmatmul(x, qts[0], plan=plans[0]).float()
            g = plans[0].qgemm_g
            best = (float("inf"), None)
            for c in configs:
                try:
                    out = torch.full_like(outs[0], float("nan"))  # an unwritten element shows as NaN
                    qgemm.qgemm(x, qts[0], out, g, c)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    t = graph_time([lambda q=q, o=o, x=x, g=g, c=c: qgemm.qgemm(x, q, o, g, c) for q, o in zip(qts, outs)], reps=7)
                except Exception as e:  # noqa: BLE001 (a config that does not compile or fit: shared memory, registers)
                    print(json.dumps({"M": M, "shape": name, "config": c, "error": str(e)[:200]}))
                    per_cfg[c] = float("inf")
                    continue
                print(json.dumps({"M": M, "shape": name, "K": K, "N": N, "config": c, "us": round(t * 1e6, 2),
                                  "tflops": round(2 * M * K * N / t / 1e12, 1), "rel_err_vs_dequant": err}))
                per_cfg[c] += t
                if t < best[0]:
                    best = (t, c)
            print(f"M={M} {name:8s} cuBLAS fp16 {t_cub * 1e6:8.1f} us  dequant+cuBLAS {t_deq * 1e6:8.1f} us  "
                  f"dot kernel {t_dot * 1e6:8.1f} us  "
                  f"qgemm best {best[0] * 1e6:8.1f} us {best[1]}  ({t_cub / best[0]:.2f} of cuBLAS's rate)  "
                  f"engine {t_auto * 1e6:8.1f} us", flush=True)
            layer["cublas"] += t_cub
            layer["dequant"] += t_deq
            layer["dot"] += t_dot
            layer["best"] += best[0]
            layer["engine"] += t_auto
            del qts, plans, outs
            torch.cuda.empty_cache()
        one = min(per_cfg, key=per_cfg.get)
        print(f"M={M} layer ms: cuBLAS fp16 {layer['cublas'] * 1e3:.3f}  dequant+cuBLAS {layer['dequant'] * 1e3:.3f}  "
              f"dot kernel {layer['dot'] * 1e3:.3f}  qgemm best per shape {layer['best'] * 1e3:.3f}  best single config {one} {per_cfg[one] * 1e3:.3f}  "
              f"engine {layer['engine'] * 1e3:.3f}",
              flush=True)
        print(json.dumps({"M": M, "layer_ms": {k: round(v * 1e3, 4) for k, v in layer.items()},
                          "single": [one, round(per_cfg[one] * 1e3, 4)]}))


if __name__ == "__main__":
    main()
