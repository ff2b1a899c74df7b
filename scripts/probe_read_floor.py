"""Probe: how close to the copy rate can anything read the bytes of one 8B matrix, at batch 1?

The issue asks the batch-1 quantized matmul for >= 75% of copy bandwidth on the large Llama-3-8B shapes. The copy
rate is measured on 1 GiB buffers; a 4-bit down projection is 30 MB, read once, so its launch, ramp-up and tail
weigh more. This times, in the harness of `scripts/bench_qmatmul.py` (a CUDA graph over enough distinct copies
that L2 never holds them, median of the replays), for the bytes of each matrix:
- `read`: a Triton kernel that only streams the bytes in and adds them up (16-byte loads, one stored word a
  program): what a kernel with no decode and no split-K reduction reaches;
- `copy`: torch's device-to-device copy of the same bytes (read + write counted, as the copy rate counts);
- `int4mm`: torch._weight_int4pack_mm, the int4 kernel gpt-fast uses, on the same shape at 4 bits (group 128);
- `ember`: ember's qmatmul at 4 bits, group 128, timed by `bench_qmatmul.bench_one` (the `--quick` table's row).
Each as a fraction of the 1 GiB copy rate measured in the same run.
Not run on a GPU yet: written in the nineteenth session, whose device budget then went on starts that found no
machine. Its read kernel was checked under TRITON_INTERPRET=1 (the sum matches torch's).

    PYTHONPATH=. python3 scripts/probe_read_floor.py [--shapes 14336x4096,4096x28672,4096x128256]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from scripts.bench_qmatmul import L2_FLUSH_BYTES, bench_one, copy_bandwidth, graph_time


@triton.jit
def _read_kernel(src, out, n_words, WORDS: tl.constexpr, ITERS: tl.constexpr):
    # each program sums ITERS chunks of WORDS int32 (16-byte loads), strided by the grid, and stores its sum
    # (one word a program: no atomics on one address)
    pid = tl.program_id(0)
    acc = tl.zeros([WORDS], tl.int32)
    for i in range(ITERS):
        offs = (pid + i * tl.num_programs(0)) * WORDS + tl.arange(0, WORDS)
        acc += tl.load(src + offs, mask=offs < n_words, other=0)
    tl.store(out + pid, tl.sum(acc))


def read_fn(buf: torch.Tensor, out: torch.Tensor, programs: int):
    words = 2048
    iters = triton.cdiv(triton.cdiv(buf.numel(), words), programs)
    return lambda: _read_kernel[(programs,)](buf, out, buf.numel(), WORDS=words, ITERS=iters, num_warps=4)


def copies(nbytes: int) -> int:
    """Distinct buffers a graph: bench_qmatmul.bench_one's rule, so every arm sees L2 as ember's row does."""
    return min(15, max(1, L2_FLUSH_BYTES // nbytes))


def int4mm_fns(K: int, N: int):
    """gpt-fast's int4 path on (1, K) bf16 x: weights packed by torch, group 128; None when unsupported."""
    fns, x = [], torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    nbytes = K * N // 2 + (K // 128) * N * 4
    for _ in range(copies(nbytes)):
        w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
        packed = torch._convert_weight_to_int4pack(w, 8)
        sz = torch.rand(K // 128, N, 2, device="cuda", dtype=torch.bfloat16)
        fns.append(lambda p=packed, s=sz: torch._weight_int4pack_mm(x, p, 128, s))
    return fns, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="14336x4096,4096x28672,4096x128256", help="K x N, comma-separated")
    args = ap.parse_args()
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device {torch.cuda.get_device_name()}; copy {bw / 1e9:.0f} GB/s (1 GiB buffers, read + write)")
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        t_ember, nbytes = bench_one(K, N, 4, 1)  # its byte count (weights, x, out) sizes the other arms
        n = copies(nbytes)
        row = {}
        bufs = [torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda") for _ in range(n)]
        out = torch.zeros(16 * sms, dtype=torch.int32, device="cuda")
        for per_sm in (4, 8, 16):
            t = graph_time([read_fn(b, out, per_sm * sms) for b in bufs])
            row[f"read ({per_sm}/SM)"] = nbytes / t
        dst = [torch.empty_like(b) for b in bufs]
        t = graph_time([lambda s=s, d=d: d.copy_(s) for s, d in zip(bufs, dst)])
        row["copy"] = 2 * nbytes / t
        del bufs, dst
        try:
            fns, ib = int4mm_fns(K, N)
            row["int4mm (gpt-fast)"] = ib / graph_time(fns)
            del fns
        except Exception as e:  # noqa: BLE001 (an unsupported torch build is reported, the rest goes on)
            print(f"  int4mm: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        row["ember qmatmul"] = nbytes / t_ember
        print(f"{K}x{N}, {nbytes / 1e6:.1f} MB at 4 bits ({n} copies a graph; ember as bench_qmatmul.bench_one):")
        for name, rate in row.items():
            print(f"  {name:20s} {rate / 1e9:7.0f} GB/s  {rate / bw:6.1%} of copy")


if __name__ == "__main__":
    main()
