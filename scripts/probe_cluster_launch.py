"""Probe (GPU, sm_90): thread-block clusters for an ordinary Triton kernel, and a sum across a cluster's CTAs
through distributed shared memory written in inline PTX, against the split-K reduction the batch-1 matmul
ships (global fp32 atomics, an acq_rel counter, the last program's read-back). Meant for Triton 3.6, whose own
cross-CTA lowering fails (scripts/probe_cluster_reduce.py).

How the cluster launch works on Triton 3.6: the kernel is compiled as usual (num_ctas=1, so program_id(0) is
the CTA's own index and no tensor is split across CTAs); then its packed launch metadata (num_warps, num_ctas,
shared) gets num_ctas = C. Triton's launcher then asks the driver for clusters of C CTAs along x and launches
gridX * C CTAs, so CTAs C*k .. C*k + C - 1 form cluster k and CTA p has rank p % C in it.

Each arm reduces C partial rows (C, N) fp32, one per CTA of a column block, to N sums:
  none    each CTA stores its own row (wrong sums; the floor: launch, load, store);
  global  the shipped scheme: fp32 atomic adds into a zeroed workspace, a barrier, an acq_rel counter atomic,
          the last CTA reads the sums back (.cg), re-zeroes them and stores;
  cluster each CTA writes its row to its own shared memory, cluster barrier, every CTA reads the C rows of its
          columns from the cluster's shared memory (mapa + ld.shared::cluster), rank 0 stores; a second cluster
          barrier keeps each CTA's memory alive until the others have read it.
Prints, per cluster size, each arm's time per launch (a CUDA graph of back-to-back launches) and its error.

    PYTHONPATH=. python3 scripts/probe_cluster_launch.py [--ctas 2,4,8,16] [--n 4096]
    PYTHONPATH=. .venv/bin/python scripts/probe_cluster_launch.py --offline   # no GPU: compile for sm_90, show SASS

Measured in call V1 (H100, docs/benchmarks.md, seventeenth round): the cluster sum is right but slower than the
atomics at every size, 2.17 against 2.14 us a launch at C = 2 and 5.10 against 2.90 at C = 16."""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from scripts.bench_qmatmul import graph_time

BN = 256
WARPS = 2
THREADS = 32 * WARPS
MODES = {"none": 0, "global": 1, "cluster": 2}
LAUNCHES = 50  # back-to-back launches in the timed graph


def _cluster_sum_asm(ranks: int, threads: int) -> str:
    """PTX for one asm instance: 4 fp32 values of this thread in $4..$7 -> their sums over the cluster's `ranks`
    CTAs in $0..$3. Each instance declares its own buffer (one 16-byte slot a thread), the same in every CTA."""
    loads = "\n".join(
        f"mapa.shared::cluster.u32 ra, a, {r};\n"
        "ld.shared::cluster.v4.f32 {t0, t1, t2, t3}, [ra];\n"
        "add.f32 $0, $0, t0;\nadd.f32 $1, $1, t1;\nadd.f32 $2, $2, t2;\nadd.f32 $3, $3, t3;"
        for r in range(ranks))
    return f"""{{
.shared .align 16 .b32 ember_cluster_buf[{4 * threads}];
.reg .b32 a, ra, tid;
.reg .f32 t0, t1, t2, t3;
mov.u32 tid, %tid.x;
mov.u32 a, ember_cluster_buf;
mad.lo.u32 a, tid, 16, a;
st.shared.v4.f32 [a], {{$4, $5, $6, $7}};
barrier.cluster.arrive.release.aligned;
barrier.cluster.wait.acquire.aligned;
mov.f32 $0, 0f00000000;
mov.f32 $1, 0f00000000;
mov.f32 $2, 0f00000000;
mov.f32 $3, 0f00000000;
{loads}
barrier.cluster.arrive.release.aligned;
barrier.cluster.wait.acquire.aligned;
}}"""


@triton.jit
def reduce_kernel(x_ptr, out_ptr, ws_ptr, cnt_ptr, N, C: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr,
                  ASM: tl.constexpr):
    """x (C, N) fp32 partial rows -> out (N,) = x.sum(0); program p: column block p // C, row p % C."""
    pid = tl.program_id(0)
    blk = pid // C
    r = pid % C
    cols = blk * BN + tl.arange(0, BN)
    x = tl.load(x_ptr + r * N + cols)  # (BN,) this split's partial sums
    if MODE == 0:
        tl.store(out_ptr + cols, x)
    elif MODE == 1:
        tl.atomic_add(ws_ptr + cols, x, sem="relaxed")
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + blk, 1, sem="acq_rel") == C - 1:
            total = tl.load(ws_ptr + cols, cache_modifier=".cg")
            tl.store(ws_ptr + cols, tl.zeros_like(total))
            tl.store(out_ptr + cols, total)
            tl.store(cnt_ptr + blk, 0)
    else:
        total = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r,r", [x], dtype=tl.float32, is_pure=False, pack=4)
        if r == 0:
            tl.store(out_ptr + cols, total)


def offline(ctas: list[int]) -> None:
    """Compile the cluster arm for sm_90 with this Triton's ptxas and print its cluster instructions."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from scripts.sass_check import disassemble

    sig = {"x_ptr": "*fp32", "out_ptr": "*fp32", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "N": "i32",
           "C": "constexpr", "BN": "constexpr", "MODE": "constexpr", "ASM": "constexpr"}
    for c in ctas:
        const = {"C": c, "BN": BN, "MODE": 2, "ASM": _cluster_sum_asm(c, THREADS)}
        k = triton.compile(ASTSource(fn=reduce_kernel, signature=sig, constexprs=const),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": WARPS})
        sass, res = disassemble(k.asm["cubin"])
        ops = [ln.split("*/")[1].strip() for ln in sass.splitlines()
               if any(o in ln for o in ("UCGABAR", "LD.E", "STS", "LDG", "STG"))]
        print(f"triton {triton.__version__}, cluster of {c}: {res.strip().splitlines()[-1].strip()}")
        print("  " + " | ".join(ops))


def run(ctas: list[int], n: int) -> None:
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, triton {triton.__version__}, N = {n}, {BN} columns a CTA, "
          f"{WARPS} warps")
    print(f"{'C':>3} {'arm':>8} {'us/launch':>10} {'max err':>10}")
    for c in ctas:
        x = torch.randn(c, n, device=dev)
        ref = x.sum(0)
        out = torch.empty(n, device=dev)
        ws = torch.zeros(n, device=dev)
        cnt = torch.zeros(n // BN, dtype=torch.int32, device=dev)
        programs = (n // BN) * c
        for name, mode in MODES.items():
            asm = _cluster_sum_asm(c, THREADS) if mode == 2 else ""
            args = (x, out, ws, cnt, n, c, BN, mode, asm)
            try:
                ck = reduce_kernel.warmup(*args, grid=(programs,), num_warps=WARPS)
                ck._init_handles()
                grid = (programs, 1, 1)
                if mode == 2:  # clusters of c along x: the launcher multiplies gridX by num_ctas
                    nw, _, shared = ck.packed_metadata
                    ck.packed_metadata = (nw, c, shared)
                    grid = (programs // c, 1, 1)
                launch = ck[grid]
                out.fill_(float("nan"))
                launch(*args)
                torch.cuda.synchronize()
                err = (out - ref).abs().max().item() if mode else float("nan")
                t = graph_time([lambda: launch(*args)] * LAUNCHES) * 1e6  # us per launch
                print(f"{c:>3} {name:>8} {t:>10.2f} {err:>10.2e}")
            except Exception as e:  # report and go on with the other arms
                print(f"{c:>3} {name:>8} failed: {type(e).__name__}: {str(e)[:200]}")
            torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ctas", default="2,4,8,16", help="cluster sizes (16 is H100's non-portable maximum)")
    p.add_argument("--n", type=int, default=4096, help="outputs (a multiple of 256)")
    p.add_argument("--offline", action="store_true", help="no GPU: compile the cluster arm for sm_90 only")
    a = p.parse_args()
    ctas = [int(v) for v in a.ctas.split(",")]
    if a.offline:
        offline(ctas)
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU of compute capability 9.0 or newer (or --offline)")
    else:
        run(ctas, a.n)


if __name__ == "__main__":
    main()
