"""GPU time of one batch-1 prefill by kernel name, from the torch profiler (eager forward, kernels launched one
by one, so each record is that kernel's own time):

  PYTHONPATH=. python3 scripts/profile_prefill.py [llama3-8b] [4.0] [prompt 512] [act]

act: the converter's act-order layout (ember bench --act-order): input permutation, zero points, rotation.
Prints the summed kernel time and the kernels that take most of it, to see what a layout adds to a prompt.
"""
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ember.bench.synthetic import build_synthetic
from ember.engine.kv_cache import KVCache
from ember.forward_batch import ForwardBatch


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "llama3-8b"
    bpw = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    prompt_len = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    act = len(sys.argv) > 4 and sys.argv[4] == "act"
    dev = torch.device("cuda")
    model = build_synthetic(name, bpw, 8, dev, max_positions=prompt_len + 64, act_order=act)
    page = 64
    n_pages = prompt_len // page + 2
    kv = KVCache(model.config, n_pages + 1, page, torch.float16, dev)
    prompt = torch.randint(0, 1000, (prompt_len,)).tolist()
    fb = ForwardBatch.build([(prompt, 0, list(range(n_pages)))], page, dev)
    with torch.inference_mode():
        for _ in range(2):  # compile, then warm
            model(fb, kv.layers())
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(fb, kv.layers())
            torch.cuda.synchronize()
    by = defaultdict(lambda: [0, 0.0])
    total = 0.0
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        d = e.time_range.end - e.time_range.start
        k = by[e.name[:80]]
        k[0] += 1
        k[1] += d
        total += d
    print(f"{name} {bpw} bpw{' act-order' if act else ''}, prompt {prompt_len}: kernels sum {total / 1e3:.2f} ms")
    for k, (c, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:16]:
        print(f"{c:5d} {d / 1e3:8.3f} ms  {k}")


if __name__ == "__main__":
    main()
