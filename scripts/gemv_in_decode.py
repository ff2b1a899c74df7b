"""Batch-1 quantized matmul bandwidth inside the decode step, per shape and width.

bench_qmatmul.py times each matmul in a CUDA graph of back-to-back copies of itself. Here each one is timed
where it runs: in the engine's graph-replayed decode step of a synthetic model whose matrices all have one
width (head included), from the torch profiler's kernel records (scripts/profile_graph.py). A matmul's time
is what it adds to the step (its end minus the previous kernel's end; PDL lets its start overlap that
kernel's tail), the mean over the layers; bytes are its stored bits / 8; the fraction is against the
device-to-device copy rate measured in the same run.

  PYTHONPATH=. python3 scripts/gemv_in_decode.py [--widths 2,3,4,5,6,8] [--model llama3-8b] [--prompt-len 512]
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from ember.bench import speed
from scripts.profile_graph import position_means, profiled_steps, step_table

STEPS = 8


def matmul_rows(model, t: dict) -> list[tuple[str, int, int, float, int]]:
    """(name, K, N, adds us, bytes) of the layer's four matmuls and of the head. The layer window may start at
    any kernel (profile_graph.step_table): the attention kernel is found by name, and the matmuls follow it
    in launch order: o, gate/up, down, then the next layer's qkv."""
    names = [t["names"][t["i0"] + j] for j in range(t["period"])]
    att = next(j for j, n in enumerate(names) if "qmatmul" not in n)
    mm = [(att + k) % t["period"] for k in range(1, t["period"])]
    assert len(mm) == 4 and all("qmatmul" in names[j] for j in mm), names
    means = position_means(t)
    layer = model.model.layers[1]
    mods = [("o", layer.self_attn.o_proj), ("gate/up", layer.mlp.gate_up_proj), ("down", layer.mlp.down_proj),
            ("qkv", layer.self_attn.qkv_proj)]
    rows = [(n, m.in_features, m.out_features, means[j][1], m.qt.stored_bits() // 8) for (n, m), j in zip(mods, mm)]
    head = max(i for i, n in enumerate(t["names"]) if "qmatmul" in n)  # the last matmul of the step
    m = model.lm_head
    rows.append(("head", m.in_features, m.out_features, t["A"][head], m.qt.stored_bits() // 8))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="2,3,4,5,6,8")
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--prompt-len", type=int, default=512)
    a = ap.parse_args()
    copy_bw = speed.copy_bandwidth(torch.device("cuda"))
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    result = {"device": torch.cuda.get_device_name(), "copy_GBps": copy_bw / 1e9, "rows": []}
    for w in (int(v) for v in a.widths.split(",")):
        # bpw w: every decoder matrix at w bits (synthetic.segment_spec), the head too
        model, *_, prof = profiled_steps(a.model, float(w), w, a.prompt_len, True, 5, STEPS)
        t = step_table(prof, STEPS)
        for name, K, N, us, nbytes in matmul_rows(model, t):
            frac = nbytes / (us * 1e-6) / copy_bw
            result["rows"].append({"bits": w, "matmul": name, "K": K, "N": N, "adds_us": us, "bytes": nbytes,
                                   "frac_copy": frac})
            print(f"{w} bits {name:>8} {K:>6} x {N:<6} adds {us:7.2f} us  {nbytes / 1e6:7.1f} MB  "
                  f"{100 * frac:5.1f}% of copy", flush=True)
        del model, prof
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gemv_in_decode.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
