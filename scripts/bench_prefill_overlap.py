"""Prefill matmuls (many rows): dequantize + cuBLAS one projection after the other (today) against
dequantizing the next projection's weights on a second stream while cuBLAS multiplies the current one.

The 8B 512-token prefill spends ~6 of ~19 ms in the dequant kernel (it writes 13 GiB of fp16 weights), which
runs between compute-bound GEMMs. Here the dequant kernel gets `programs` persistent programs (so it holds a
few SMs, not the whole GPU), optionally with cuBLASLt told to leave that many SMs free
(torch._C._set_sm_carveout_experimental). Prints ms per decoder layer's four matmuls for each arm.
The fp8 arms time the FP8 path (kernels/qmatmul_fp8.py): whole (fp8), its weight-code kernel alone (fp8codes),
its activation rounding alone (fp8act) and cuBLAS's block-scaled GEMMs alone (fp8mm).

  PYTHONPATH=. python3 scripts/bench_prefill_overlap.py [--rows 512,2048] [--layers 4] [--width 4]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os

import torch

from ember.kernels import qmatmul_fp8 as f8
from ember.kernels.qmatmul import dequantize_permuted, make_plan, qmatmul
from scripts.bench_qmatmul import LAYER, graph_time, random_qt


@contextlib.contextmanager
def blas(lt: bool, carveout: int | None):
    old_lib = torch.backends.cuda.preferred_blas_library()
    old_c = torch._C._get_sm_carveout_experimental()
    if lt:
        torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(old_lib)
        torch._C._set_sm_carveout_experimental(old_c)


def run_serial(work, buf, programs, cfg):
    for x, qt, plan, out in work:
        w = dequantize_permuted(qt, plan, x.dtype, out=buf[0], programs=programs, pdl_on=False, **cfg)
        torch.mm(x, w, out=out)


def run_overlap(work, buf, programs, side, ev_deq, ev_mm, cfg):
    """deq(i + 1) on `side` beside mm(i) on the current stream; buffers alternate."""
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    ws = [None] * len(work)

    def deq(i):
        x, qt, plan, _ = work[i]
        with torch.cuda.stream(side):
            if i >= 2:
                side.wait_event(ev_mm[i - 2])  # mm(i - 2) read the buffer deq(i) writes
            ws[i] = dequantize_permuted(qt, plan, x.dtype, out=buf[i % 2], programs=programs, pdl_on=False, **cfg)
            ev_deq[i].record(side)

    deq(0)
    for i, (x, _, _, out) in enumerate(work):
        if i + 1 < len(work):
            deq(i + 1)
        main.wait_event(ev_deq[i])
        torch.mm(x, ws[i], out=out)
        ev_mm[i].record(main)
    main.wait_stream(side)


def arm_fn(kind, work, buf, programs, side, ev_deq, ev_mm, dense, cfg, fp8):
    if kind == "serial":
        return lambda: run_serial(work, buf, programs, cfg)
    if kind == "overlap":
        return lambda: run_overlap(work, buf, programs, side, ev_deq, ev_mm, cfg)
    if kind == "mmonly":  # the GEMMs alone (weights already fp16: 4 distinct ones, reused by every layer)
        return lambda: [torch.mm(x, dense[i % 4], out=o) for i, (x, _, _, o) in enumerate(work)]
    if kind == "fp8":  # the whole FP8 path, through qmatmul
        return lambda: [qmatmul(x, q, out=o, plan=fp8["plans"][i]) for i, (x, q, _, o) in enumerate(work)]
    if kind == "fp8codes":
        return lambda: [f8.fp8_codes(q, fp8["plans"][i].fp8, **cfg) for i, (_, q, _, _) in enumerate(work)]
    if kind == "fp8act":
        return lambda: [f8.quantize_act(x, q.perm) for x, q, _, _ in work]
    if kind == "fp8mm":  # the GEMMs alone on ready fp8 operands (4 distinct weights, reused by every layer)
        return lambda: [f8.block_scaled_mm(*fp8["acts"][i % 4], *fp8["codes"][i % 4], torch.float16, out=o)
                        for i, (_, _, _, o) in enumerate(work)]
    if kind == "deqonly":
        return lambda: [dequantize_permuted(q, p, torch.float16, out=buf[i % 2], programs=programs, pdl_on=False,
                                            **cfg) for i, (_, q, p, _) in enumerate(work)]
    raise SystemExit(f"unknown arm kind {kind}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="512,2048")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--arms", default="serial:0:-:0,serial:0:-:1,mmonly:0:-:0,mmonly:0:-:1,deqonly:0:-:0,"
                    "deqonly:16:-:0,deqonly:32:-:0,deqonly:48:-:0,overlap:0:-:0,overlap:16:-:0,overlap:32:-:0,"
                    "overlap:48:-:0,overlap:16:16:1,overlap:24:24:1,overlap:32:32:1,overlap:48:48:1,serial:0:-:0",
                    help="kind:programs(0 = full grid):carveout(- = none):lt(0/1)[:warps:block columns] of the dequant "
                    "kernel (default 4:64), comma-separated")
    a = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    qts = [[random_qt(K, N, a.width) for K, N in LAYER] for _ in range(a.layers)]
    plans = [[make_plan(q, large_mode="dequant") for q in layer] for layer in qts]
    plans8 = [make_plan(q, large_mode="dequant", fp8=True) for layer in qts for q in layer]
    buf = [torch.empty(max(K * N for K, N in LAYER), device=dev, dtype=torch.float16) for _ in range(2)]
    side = torch.cuda.Stream()
    rows = []
    print(f"{torch.cuda.get_device_name(dev)}, {sms} SMs, {a.layers} layers of {a.width}-bit weights", flush=True)
    for M in (int(v) for v in a.rows.split(",")):
        xs = {K: torch.randn(M, K, device=dev, dtype=torch.float16) for K, _ in LAYER}
        outs = [[torch.empty(M, N, device=dev, dtype=torch.float16) for _, N in LAYER] for _ in range(a.layers)]
        work = [(xs[K], q, p, o) for layer_q, layer_p, layer_o in zip(qts, plans, outs)
                for (K, _), q, p, o in zip(LAYER, layer_q, layer_p, layer_o)]
        dense = [dequantize_permuted(q, p, torch.float16) for _, q, p, _ in work[:4]]
        fp8 = {"plans": plans8, "acts": [f8.quantize_act(x, q.perm) for x, q, _, _ in work[:4]],
               "codes": [(f8.fp8_codes(q, p.fp8), q.scales.float()) for (_, q, _, _), p in zip(work, plans8)][:4]}
        ev_deq = [torch.cuda.Event() for _ in work]
        ev_mm = [torch.cuda.Event() for _ in work]
        flop = 2 * M * sum(K * N for K, N in LAYER)
        ref = None
        for arm in a.arms.split(","):
            kind, progs, carve, lt, *wb = arm.split(":")
            cfg = {"warps": int(wb[0]), "bn": int(wb[1])} if wb else {}
            programs = int(progs) or None
            carveout = None if carve == "-" else int(carve)
            with blas(lt == "1", carveout):
                fn = arm_fn(kind, work, buf, programs, side, ev_deq, ev_mm, dense, cfg, fp8)
                ms = graph_time([fn], reps=7) * 1e3 / a.layers  # one graph of the whole arm; seconds a replay
            if kind in ("serial", "overlap", "fp8"):
                got = torch.cat([o.float().flatten()[:4096] for o in outs[-1]])
                ref = got if ref is None else ref
                err = (got - ref).abs().max().item()
            else:
                err = float("nan")
            rows.append({"M": M, "arm": arm, "ms_per_layer": ms, "tflops": flop / ms / 1e9})
            print(f"M={M:5d} {arm:24s} {ms:7.3f} ms/layer  {flop / ms / 1e9:6.0f} TFLOP/s  max|diff| {err:.3g}",
                  flush=True)
        del outs, work, dense, fp8
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "prefill_overlap.json"), "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
