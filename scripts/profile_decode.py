"""Per-kernel time of one batch-1 decode step and of one 512-token prefill of a synthetic model (torch
profiler, eager).

  PYTHONPATH=. python3 scripts/profile_decode.py [llama3-8b] [4.0]
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from ember.bench.synthetic import build_synthetic
from ember.engine.kv_cache import KVCache
from ember.engine.runner import DecodeRunner
from ember.forward_batch import ForwardBatch

name = sys.argv[1] if len(sys.argv) > 1 else "llama3-8b"
bpw = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
dev = torch.device("cuda")
model = build_synthetic(name, bpw, 6, dev, max_positions=1024)
kv = KVCache(model.config, 10, 64, torch.float16, dev)
pages = list(range(9))
prompt = torch.randint(0, 1000, (512,)).tolist()
with torch.inference_mode():
    first = int(model(ForwardBatch.build([(prompt, 0, pages)], 64, dev), kv.layers()).argmax(-1)[0])
r = DecodeRunner(model, kv, 1, 9, dev, use_graphs=False)
r.set_sequence(0, first, 512, pages)
for _ in range(3):
    r.step(1)
torch.cuda.synchronize()
steps = 5
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(steps):
        r.step(1)
    torch.cuda.synchronize()


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
