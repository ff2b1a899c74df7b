"""Per-kernel time of one batch-1 decode step and of one 512-token prefill of a synthetic model (torch
profiler, eager).

  PYTHONPATH=. python3 scripts/profile_decode.py [llama3-8b] [4.0]
"""
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ember.forward_batch import ForwardBatch
from scripts.profile_graph import profiled_steps

name = sys.argv[1] if len(sys.argv) > 1 else "llama3-8b"
bpw = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
dev = torch.device("cuda")
steps = 5
model, kv, pages, prompt, prof = profiled_steps(name, bpw, 6, 512, False, 3, steps)  # eager steps


def report(prof, steps, what):
    tot = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        c, t = tot.get(e.name[:60], (0, 0.0))
        tot[e.name[:60]] = (c + 1, t + e.device_time_total)
    total = sum(t for _, t in tot.values())
    print(f"{what}: kernels {sum(c for c, _ in tot.values()) / steps:.0f}, GPU busy {total / steps / 1e3:.3f} ms")
    for k, (c, t) in sorted(tot.items(), key=lambda kv: -kv[1][1])[:14]:
        print(f"{t / steps:9.1f} us {c // steps:4d}x  {k}")


report(prof, steps, "decode step")
fb = ForwardBatch.build([(prompt, 0, pages)], 64, dev)
with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
    model(fb, kv.layers())
    torch.cuda.synchronize()
report(prof, 1, "prefill 512")

# Host overhead of an eager prefill: wall time (synchronized) against the same forward replayed as one CUDA
# graph (no launch cost), and the host-side ops that cost most.

def wall(fn, reps=5):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


with torch.inference_mode():
    eager = wall(lambda: model(fb, kv.layers()))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model(fb, kv.layers())
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        model(fb, kv.layers())
    graphed = wall(g.replay)
print(f"prefill 512 wall: eager {eager * 1e3:.2f} ms ({512 / eager:.0f} tok/s), as one CUDA graph "
      f"{graphed * 1e3:.2f} ms ({512 / graphed:.0f} tok/s)")
del g
with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
    model(fb, kv.layers())
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
