"""Attention kernel benchmark (CUDA): split-K decode time vs the KV bytes it must read (as a fraction of
device copy bandwidth), and prefill: Triton flash over the paged cache vs torch SDPA on contiguous k/v.
Llama-3-8B attention shapes (Hq 32, Hk 8, D 128), bf16, 64-token pages. Writes $OUT/attention.json if OUT
is set.  Run: PYTHONPATH=. python3 scripts/bench_attention.py"""
from __future__ import annotations

import json
import math
import os
import sys

import torch
import triton
from triton.testing import do_bench

from ember.kernels import ops
from ember.kernels.attention import prefill_sdpa
from ember.kernels.attention_decode import choose_num_splits, decode_attention
from ember.kernels.attention_prefill import prefill_attention
from ember.kernels.reference import rope_cos_sin

HQ, HK, D, PAGE, DTYPE = 32, 8, 128, 64, torch.bfloat16
DEV = torch.device("cuda")


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s (bytes read + written), 1 GiB buffers."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300)
    return 2 * x.numel() / (ms * 1e-3)


def paged_setup(batch: int, ctx: int, copies: int, g: torch.Generator):
    """One cache holding `copies` independent (layer-like) batches of `batch` sequences of ctx tokens on
    shuffled pages. Returns caches and one block table per copy."""
    n_pages = math.ceil(ctx / PAGE)
    total = copies * batch * n_pages
    kc = torch.randn(total, HK, PAGE, D, device=DEV, dtype=DTYPE)
    vc = torch.randn_like(kc)
    perm = torch.randperm(total, generator=g).to(DEV, torch.int32)
    tables = perm.view(copies, batch, n_pages)
    return kc, vc, tables


def time_graph(fn, reps: int = 20) -> float:
    """ms per replay of a CUDA graph of fn (compiled first, outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def bench_decode(batch: int, ctx: int, copy_bw: float, **kw) -> dict:
    kv_bytes = batch * ctx * HK * D * 2 * DTYPE.itemsize  # K and V
    # Several layer-like copies, each read once per replay, so small caches are not served from L2.
    copies = max(1, min(32, math.ceil((256 << 20) / kv_bytes)))
    g = torch.Generator().manual_seed(0)
    kc, vc, tables = paged_setup(batch, ctx, copies, g)
    q = torch.randn(batch, HQ, D, device=DEV, dtype=DTYPE)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV)

    def step():
        for c in range(copies):
            decode_attention(q, kc, vc, tables[c], lens, qsl, D ** -0.5, **kw)

    ms = time_graph(step) / copies
    bw = kv_bytes / (ms * 1e-3)
    splits = kw.get("num_splits") or choose_num_splits(batch, HK, tables.shape[2] * PAGE, DEV)
    return dict(batch=batch, ctx=ctx, us=round(ms * 1e3, 2), kv_mib=round(kv_bytes / 2**20, 2),
                gb_s=round(bw / 1e9, 1), frac_copy_bw=round(bw / copy_bw, 3), num_splits=splits,
                **{k: v for k, v in kw.items() if k != "num_splits"})


def bench_decode_rope(ctx: int, copy_bw: float) -> dict:
    """Batch 1, what a decode layer launches: rope_store_kv + decode_attention (two launches) against
    decode_attention_rope (one: rope, the new token's KV write and the merge in the split kernel)."""
    kv_bytes = ctx * HK * D * 2 * DTYPE.itemsize
    copies = max(1, min(32, math.ceil((256 << 20) / kv_bytes)))
    g = torch.Generator().manual_seed(0)
    kc, vc, tables = paged_setup(1, ctx, copies, g)
    qkv = torch.randn(1, (HQ + 2 * HK) * D, device=DEV, dtype=DTYPE)
    q, k, v = (x.view(1, -1, D) for x in qkv.split([HQ * D, HK * D, HK * D], -1))
    cos_sin = rope_cos_sin(D, 8192, 500000.0).to(DEV)
    pos = torch.tensor([ctx - 1], device=DEV)
    slots = [tables[c, 0, (ctx - 1) // PAGE].long() * PAGE + (ctx - 1) % PAGE for c in range(copies)]
    slots = [s.view(1) for s in slots]
    lens = torch.tensor([ctx], dtype=torch.int32, device=DEV)
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=DEV)

    def separate():
        for c in range(copies):
            qr, _ = ops.rope_store_kv(q, k, v, pos, cos_sin, kc, vc, slots[c])
            decode_attention(qr, kc, vc, tables[c], lens, qsl, D ** -0.5)

    def fused():
        for c in range(copies):
            ops.decode_attention_rope(q, k, v, pos, cos_sin, kc, vc, slots[c], tables[c], lens, qsl, D ** -0.5)

    sep, fus = time_graph(separate) / copies, time_graph(fused) / copies
    return dict(ctx=ctx, separate_us=round(sep * 1e3, 2), fused_us=round(fus * 1e3, 2),
                fused_frac_copy_bw=round(kv_bytes / (fus * 1e-3) / copy_bw, 3))


def bench_prefill(n: int) -> dict:
    g = torch.Generator().manual_seed(1)
    kc, vc, tables = paged_setup(1, n, 1, g)
    q = torch.randn(n, HQ, D, device=DEV, dtype=DTYPE)
    # the same keys/values as contiguous (T, Hk, D) tensors, as the layer has them before store_kv
    k = kc[tables[0, 0].long()].transpose(1, 2).reshape(-1, HK, D)[:n].contiguous()
    v = vc[tables[0, 0].long()].transpose(1, 2).reshape(-1, HK, D)[:n].contiguous()
    lens = torch.tensor([n], dtype=torch.int32, device=DEV)
    qsl = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    flops = 4 * HQ * D * n * (n + 1) / 2  # causal: QK^T and PV over the lower triangle
    res = {"n": n}
    configs = [None, (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)]
    for cfg in configs:
        ms = do_bench(lambda cfg=cfg: prefill_attention(q, kc, vc, tables[0], lens, qsl, D ** -0.5,
                                                        config=cfg))
        res[f"triton_{cfg or 'default'}_us"] = round(ms * 1e3, 1)
        res[f"triton_{cfg or 'default'}_tflops"] = round(flops / (ms * 1e-3) / 1e12, 1)
    ms = do_bench(lambda: prefill_sdpa(q, k, v, [0, n], D ** -0.5))
    res.update(sdpa_us=round(ms * 1e3, 1), sdpa_tflops=round(flops / (ms * 1e-3) / 1e12, 1))
    kr, vr = k.repeat_interleave(HQ // HK, 1), v.repeat_interleave(HQ // HK, 1)
    ms = do_bench(lambda: prefill_sdpa(q, kr, vr, [0, n], D ** -0.5))
    res.update(sdpa_repeated_kv_us=round(ms * 1e3, 1))
    # correctness of the two paths against each other
    a = prefill_attention(q, kc, vc, tables[0], lens, qsl, D ** -0.5)
    b = prefill_sdpa(q, k, v, [0, n], D ** -0.5)
    res["max_abs_diff_triton_vs_sdpa"] = (a.float() - b.float()).abs().max().item()
    return res


def bench_rope_store(t: int) -> dict:
    """rope + store_kv (two launches) vs rope_store_kv (one), 32 layer-like calls in a CUDA graph."""
    qkv = torch.randn(t, (HQ + 2 * HK) * D, device=DEV, dtype=DTYPE)
    q, k, v = (x.view(t, -1, D) for x in qkv.split([HQ * D, HK * D, HK * D], -1))
    cos_sin = rope_cos_sin(D, 8192, 500000.0).to(DEV)
    pos = torch.randint(0, 8192, (t,), device=DEV)
    kc = torch.zeros(2 * t // PAGE + 2, HK, PAGE, D, device=DEV, dtype=DTYPE)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(kc.shape[0] * PAGE, device=DEV)[:t]

    def separate():
        for _ in range(32):
            _, k2 = ops.rope(q, k, pos, cos_sin)
            ops.store_kv(k2, v, kc, vc, slots)

    def fused():
        for _ in range(32):
            ops.rope_store_kv(q, k, v, pos, cos_sin, kc, vc, slots)

    return {"t": t, "separate_us": round(time_graph(separate) * 1e3 / 32, 2),
            "fused_us": round(time_graph(fused) * 1e3 / 32, 2)}


def main() -> None:
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    bw = copy_bandwidth()
    result["copy_bw_gb_s"] = round(bw / 1e9, 1)
    print(f"{result['device']}: copy bandwidth {result['copy_bw_gb_s']} GB/s")
    sections = {
        "decode": lambda: [bench_decode(b, c, bw) for b in (1, 32) for c in (512, 2048, 8192)],
        "decode_sweep": lambda: [bench_decode(b, c, bw, block_n=bn, num_warps=w)
                                 for b, c in ((1, 8192), (32, 2048))
                                 for bn, w in ((64, 4), (128, 4), (32, 8))]
        + [bench_decode(1, 8192, bw, num_splits=s) for s in (16, 64)],
        # batch 1 after a 512 / 2048-token prompt, as the engine runs it: its block tables span the whole
        # context window (4096 -> 32 splits), so most splits get one block of keys
        "decode_short": lambda: [bench_decode(1, c, bw, num_splits=s, block_n=bn)
                                 for c in (576, 2112)
                                 for s, bn in ((32, 32), (16, 32), (8, 32), (8, 64), (4, 64), (4, 128), (2, 128))],
        "decode_rope": lambda: [bench_decode_rope(c, bw) for c in (576, 2112)],
        "prefill": lambda: [bench_prefill(n) for n in (512, 2048)],
        "rope_store_kv": lambda: [bench_rope_store(t) for t in (1, 32, 2048)],
    }
    wanted = sys.argv[1:] or list(sections)  # e.g. `bench_attention.py prefill decode`
    for name, fn in sections.items():
        if name not in wanted:
            continue
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001  (keep what the other sections measured)
            result[name] = f"error: {type(e).__name__}: {e}"
        print(name, json.dumps(result[name], indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attention.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
