"""Probe (device): does torch._scaled_mm take 1x128 x 1x128 block scales here, with which output dtypes, and how
fast is it against the fp16 cuBLAS matmul on the 8B layer shapes? Prints one line per case. (Call L2 tried the
other scale layouts with a one-off variant of this script: torch 2.11 takes only sa (M, K/128) with strides
(1, M) and sb (K/128, N) contiguous; raw log in bench/results/raw-2026-11-27-s9/L2.)"""

# ruff: noqa: B023  (each lambda runs inside its loop iteration)
import sys

import torch

sys.path.insert(0, "scripts")
from bench_qmatmul import LAYER, graph_time

dev = "cuda"
print("torch", torch.__version__, "cuda", torch.version.cuda, "cublaslt", torch._C._cuda_getCompiledVersion())
torch.manual_seed(0)


def mk(M, K, N):
    x = torch.randn(M, K, device=dev, dtype=torch.float16)
    q = torch.randint(-8, 8, (N, K), device=dev).float()
    s = torch.rand(K // 128, N, device=dev) * 0.02 + 0.001  # (G, N)
    return x, q, s


def quant_x(x):
    M, K = x.shape
    xb = x.float().view(M, K // 128, 128)
    sc = xb.abs().amax(-1).clamp_min(1e-20) / 448.0  # (M, G)
    a8 = (xb / sc[..., None]).to(torch.float8_e4m3fn).view(M, K)
    return a8, sc


for M in (512, 2048):
    for K, N in LAYER:
        x, q, s = mk(M, K, N)
        w16 = (q.view(N, K // 128, 128) * s.t()[..., None]).view(N, K).half()  # (N, K)
        ref = x.float() @ w16.float().t()
        a8, sc = quant_x(x)
        b8 = q.to(torch.float8_e4m3fn)  # (N, K) row-major -> b8.t() column-major (K, N)
        sa = sc.t().contiguous().t()  # (M, G) stride (1, M)
        sb = s  # (G, N) contiguous: the layout torch 2.11's _scaled_mm takes for 1x128 blocks
        w16t = w16.t().contiguous()  # (K, N) like the dequant scratch
        t16 = graph_time([lambda: torch.matmul(x, w16t)], reps=10)
        flop = 2 * M * K * N
        line = f"M={M} K={K} N={N}: fp16 {t16 * 1e6:8.1f} us {flop / t16 / 1e12:6.0f} TF"
        for od in (torch.float16, torch.bfloat16):
            try:
                y = torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=od)
                torch.cuda.synchronize()
                err = ((y.float() - ref).norm() / ref.norm()).item()
                t8 = graph_time(
                    [lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=od)], reps=10
                )
                line += f" | fp8 blk->{str(od)[6:]} {t8 * 1e6:8.1f} us {flop / t8 / 1e12:6.0f} TF relerr {err:.4f}"
            except Exception as e:  # noqa: BLE001
                line += f" | fp8 blk->{str(od)[6:]} FAIL {type(e).__name__}: {str(e)[:200]}"
        # reference error of fp16 path vs fp32
        e16 = ((torch.matmul(x, w16t).float() - ref).norm() / ref.norm()).item()
        print(line + f" | fp16 relerr {e16:.5f}", flush=True)
# tensorwise for comparison
M, K, N = 2048, 4096, 28672
x, q, s = mk(M, K, N)
a8 = x.to(torch.float8_e4m3fn)
b8 = q.to(torch.float8_e4m3fn)
one = torch.ones((), device=dev)
t = graph_time(
    [lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.float16)], reps=10
)
print(f"tensorwise fp8 M={M} K={K} N={N}: {t * 1e6:.1f} us {2 * M * K * N / t / 1e12:.0f} TF")
