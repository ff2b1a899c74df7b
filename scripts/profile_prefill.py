"""GPU time of one batch-1 prefill by kernel name, from the torch profiler:

  PYTHONPATH=. python3 scripts/profile_prefill.py [llama3-8b] [4.0] [prompt 512] [act|graph]

Default: an eager forward (kernels launched one by one, so each record is that kernel's own time).
act: the converter's act-order layout (ember bench --act-order): input permutation, zero points, rotation.
graph: the engine's path (PrefillRunner's CUDA graph, as `ember bench` times it). It prints, besides the
kernels, the replay's GPU time (events around the replay alone) and the wall time of the whole call the bench
times (host input copies, replay, argmax, read back), so the host's share of a prompt shows; and each kernel's
time as what it adds to the replay (its end minus the previous kernel's end), which counts the gaps between
kernels, summed by name.
"""
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from ember.bench.synthetic import build_synthetic
from ember.engine.kv_cache import KVCache
from ember.engine.prefill_runner import PrefillRunner
from ember.forward_batch import ForwardBatch


def table(events, title: str, added: bool = False) -> None:
    """Per-name count and time; added: each kernel's end minus the previous kernel's end (gaps included)."""
    by = defaultdict(lambda: [0, 0.0])
    total, prev_end = 0.0, None
    for e in sorted(events, key=lambda e: e.time_range.start):
        d = e.time_range.end - e.time_range.start
        if added and prev_end is not None:
            d = max(0.0, e.time_range.end - prev_end)
        prev_end = e.time_range.end if prev_end is None else max(prev_end, e.time_range.end)
        k = by[e.name[:80]]
        k[0] += 1
        k[1] += d
        total += d
    print(f"{title}: {len(events)} kernels, {total / 1e3:.3f} ms")
    for k, (c, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:18]:
        print(f"{c:5d} {d / 1e3:8.3f} ms  {k}")


def host_timeline(events) -> None:
    """Where a whole prefill call's wall time goes: host calls of 20+ us, the GPU's copies and its first and
    last kernel, in us from the first event."""
    t0 = min(e.time_range.start for e in events)
    gpu = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    rows = [(e.time_range.start, e.time_range.end, "cpu " + e.name[:60]) for e in events
            if e.device_type.name == "CPU" and e.time_range.end - e.time_range.start >= 20]
    if gpu:
        rows += [(gpu[0].time_range.start, gpu[0].time_range.end, "gpu first " + gpu[0].name[:50]),
                 (gpu[-1].time_range.start, gpu[-1].time_range.end, "gpu last " + gpu[-1].name[:50])]
        rows += [(e.time_range.start, e.time_range.end, "gpu " + e.name[:50])
                 for e in gpu if "emcpy" in e.name]
    print("one prefill call (us from its first event): start end what")
    rows.sort()
    for a, b, what in rows[:24] + [(0, 0, "...")] + rows[-12:] if len(rows) > 36 else rows:
        print(f"{a - t0:10.1f} {b - t0:10.1f}  {what}")


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "llama3-8b"
    bpw = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    prompt_len = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    mode = sys.argv[4] if len(sys.argv) > 4 else "plain"
    act = mode == "act"
    dev = torch.device("cuda")
    model = build_synthetic(name, bpw, 8, dev, max_positions=prompt_len + 64, act_order=act)
    page = 64
    n_pages = prompt_len // page + 2
    kv = KVCache(model.config, n_pages + 1, page, torch.float16, dev)
    prompt = torch.randint(0, 1000, (prompt_len,)).tolist()
    pages = list(range(n_pages))
    if mode == "graph":
        runner = PrefillRunner(model, kv, n_pages, dev)
        runner.forward(prompt, pages)  # captures the graph
        graph = runner.graphs[runner.bucket(prompt_len)]
        walls, gpus, hosts, syncs = [], [], [], []
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        for i in range(12):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = runner.forward(prompt, pages)
            hosts.append(time.perf_counter() - t0)  # staging and the graph launch, until forward returns
            logits.argmax(-1).tolist()  # what the bench times
            walls.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.forward(prompt, pages)
            torch.cuda.synchronize()  # the same without the argmax and its read-back
            syncs.append(time.perf_counter() - t0)
            ev[0].record()
            graph.replay()
            ev[1].record()
            torch.cuda.synchronize()
            gpus.append(ev[0].elapsed_time(ev[1]) / 1e3)
        wall, gpu = statistics.median(walls[2:]), statistics.median(gpus[2:])
        print(f"{name} {bpw} bpw, prompt {prompt_len}, graph: wall {wall * 1e3:.3f} ms"
              f" ({prompt_len / wall:,.0f} tok/s),"
              f" replay alone {gpu * 1e3:.3f} ms ({prompt_len / gpu:,.0f} tok/s), forward() returns after"
              f" {statistics.median(hosts[2:]) * 1e6:.0f} us;"
              f" forward + synchronize {statistics.median(syncs[2:]) * 1e3:.3f} ms")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            runner.forward(prompt, pages).argmax(-1).tolist()
        host_timeline(prof.events())
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        kern = [e for e in prof.events() if e.device_type.name == "CUDA"]
        table(kern, "graph replay, kernel time")
        table(kern, "graph replay, time added (gaps included)", added=True)
        return
    fb = ForwardBatch.build([(prompt, 0, pages)], page, dev)
    with torch.inference_mode():
        for _ in range(2):  # compile, then warm
            model(fb, kv.layers())
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(fb, kv.layers())
            torch.cuda.synchronize()
    kern = [e for e in prof.events() if e.device_type.name == "CUDA"]
    table(kern, f"{name} {bpw} bpw{' act-order' if act else ''}, prompt {prompt_len}: kernels sum")


if __name__ == "__main__":
    main()
