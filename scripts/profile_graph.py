"""Timeline of one batch-1 decode step as the engine runs it (CUDA graph, PDL), from the torch profiler's
kernel records: where each kernel starts and ends, and how much each one adds to the step.

  PYTHONPATH=. python3 scripts/profile_graph.py [llama3-8b] [4.0] [head bits 8] [prompt 512] [act]

(act: the converter's act-order layout, ember bench --act-order.)

scripts/profile_decode.py times kernels launched one by one (eager), which hides the overlap that PDL gives
and the gaps a graph still has. Here "adds" is end(i) - end(i - 1): summed over a step it is the step's
GPU time, and a kernel that overlaps its predecessor adds less than it lasts.
"""
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ember.bench.synthetic import build_synthetic
from ember.engine.kv_cache import KVCache
from ember.engine.runner import DecodeRunner
from ember.forward_batch import ForwardBatch


def profiled_steps(name: str, bpw: float, head_bits: int, prompt_len: int, use_graphs: bool, warm: int,
                   steps: int, act_order: bool = False):
    """A synthetic model prefilled with a random prompt (64-token pages), `warm` batch-1 greedy decode steps,
    then `steps` more under the torch profiler (CUDA activity) -> (model, kv, pages, prompt, profile)."""
    dev = torch.device("cuda")
    model = build_synthetic(name, bpw, head_bits, dev, max_positions=prompt_len + 512, act_order=act_order)
    page = 64
    n_pages = (prompt_len + 256) // page + 1
    kv = KVCache(model.config, n_pages + 1, page, torch.float16, dev)
    pages = list(range(n_pages))
    prompt = torch.randint(0, 1000, (prompt_len,)).tolist()
    with torch.inference_mode():
        first = int(model(ForwardBatch.build([(prompt, 0, pages)], page, dev), kv.layers()).argmax(-1)[0])
    r = DecodeRunner(model, kv, 1, n_pages, dev, use_graphs=use_graphs)
    r.set_sequence(0, first, prompt_len, pages)
    for _ in range(warm):
        r.step(1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            r.step(1)
        torch.cuda.synchronize()
    return model, kv, pages, prompt, prof


def step_table(prof, steps: int) -> dict:
    """Per-kernel medians over `steps` profiled graph replays of one decode step: names, D (lasts), A (adds =
    end - previous end), G (gap = start - previous end), in us; the layer period (kernels a layer), the first
    kernel of the repeated layers (i0) and their count; the step's period, busy time and summed durations."""
    ev = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    per = len(ev) // steps
    if per < 3:
        sys.exit(f"only {len(ev)} kernel records for {steps} graph replays: this profiler does not trace inside graphs")
    if per * steps != len(ev):
        print(f"warning: {len(ev)} records for {steps} steps")
    rows = [ev[i * per:(i + 1) * per] for i in range(steps)]
    periods = [rows[i + 1][0].time_range.start - rows[i][0].time_range.start for i in range(steps - 1)]
    busy = [s[-1].time_range.end - s[0].time_range.start for s in rows]
    names = [e.name for e in rows[0]]
    dur = [[] for _ in range(per)]
    add = [[] for _ in range(per)]
    gap = [[] for _ in range(per)]
    for s in rows:
        for i, e in enumerate(s):
            dur[i].append(e.time_range.end - e.time_range.start)
            prev = s[i - 1].time_range.end if i else e.time_range.start
            add[i].append(e.time_range.end - prev)
            gap[i].append(e.time_range.start - prev)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    D, A, G = ([med(x) for x in xs] for xs in (dur, add, gap))
    # the layer period: the smallest P with names[i] == names[i + P] over the middle of the step
    period = next((p for p in range(2, 16) if all(names[i] == names[i + p] for i in range(per // 4, per // 2))), 0)
    i0 = layers = 0
    for start in range(per - period if period else 0):  # the start repeating for the most layers (earliest on ties)
        n = 0
        while start + (n + 1) * period <= per and names[start + n * period:start + (n + 1) * period] == \
                names[start:start + period]:
            n += 1
        if n > layers:
            i0, layers = start, n
    return {"names": names, "D": D, "A": A, "G": G, "per": per, "period": period, "i0": i0, "layers": layers,
            "step_period": med(periods), "busy": med(busy),
            "summed": sum(e.time_range.end - e.time_range.start for e in rows[steps // 2])}


def position_means(t: dict) -> list[tuple[float, float, float]]:
    """(lasts, adds, gap) of each position of the repeated layer, the mean over the layers."""
    out = []
    for j in range(t["period"]):
        idx = [t["i0"] + k * t["period"] + j for k in range(t["layers"])]
        out.append(tuple(sum(t[key][i] for i in idx) / t["layers"] for key in ("D", "A", "G")))
    return out


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "llama3-8b"
    bpw = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    head_bits = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    prompt_len = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    act = len(sys.argv) > 5 and sys.argv[5] == "act"
    steps = 8
    t = step_table(profiled_steps(name, bpw, head_bits, prompt_len, True, 5, steps, act)[-1], steps)
    names, D, A, G, per, period = t["names"], t["D"], t["A"], t["G"], t["per"], t["period"]
    print(f"{name} {bpw} bpw, head {head_bits} bits, prompt {prompt_len}: {per} kernels a step; "
          f"step period {t['step_period']:.1f} us, first start -> last end {t['busy']:.1f} us, summed durations "
          f"{t['summed']:.1f} us")
    print(f"layer period {period} kernels")
    if period:
        i0, layers = t["i0"], t["layers"]
        print(f"{layers} layers from kernel {i0}; per layer position (mean over layers):")
        print(f"{'pos':>3} {'lasts us':>9} {'adds us':>8} {'gap us':>7}  kernel")
        tot_a = 0.0
        for j, (d, a, g) in enumerate(position_means(t)):
            tot_a += a * layers
            print(f"{j:3d} {d:9.2f} {a:8.2f} {g:7.2f}  {names[i0 + j][:90]}")
        print(f"layers add {tot_a:.1f} us; outside the layers:")
        outside = list(range(i0)) + list(range(i0 + layers * period, per))
    else:
        outside = range(per)
    for i in outside:
        print(f"{i:3d} {D[i]:9.2f} {A[i]:8.2f} {G[i]:7.2f}  {names[i][:90]}")
    by = defaultdict(lambda: [0, 0.0, 0.0])
    for i in range(per):
        k = by[names[i][:60]]
        k[0] += 1
        k[1] += D[i]
        k[2] += A[i]
    print("by kernel name (a step): count, lasts, adds")
    for k, (c, d, a) in sorted(by.items(), key=lambda kv: -kv[1][2]):
        print(f"{c:4d} {d:9.1f} {a:9.1f}  {k}")


if __name__ == "__main__":
    main()
