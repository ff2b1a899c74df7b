"""Probe 2: which scale layouts does torch._scaled_mm accept for 1x128 block scaling (and the v2 API)?"""

# ruff: noqa: B023
import sys

import torch

sys.path.insert(0, "scripts")
from bench_qmatmul import graph_time

dev = "cuda"
M, K, N = 512, 4096, 6144
x = torch.randn(M, K, device=dev, dtype=torch.float16)
q = torch.randint(-8, 8, (N, K), device=dev).float()
s = torch.rand(K // 128, N, device=dev) * 0.02 + 0.001  # (G, N)
w = (q.view(N, K // 128, 128) * s.t()[..., None]).view(N, K)
ref = x.float() @ w.t()
xb = x.float().view(M, K // 128, 128)
sc = xb.abs().amax(-1).clamp_min(1e-20) / 448.0  # (M, G)
a8 = (xb / sc[..., None]).to(torch.float8_e4m3fn).view(M, K)
b8 = q.to(torch.float8_e4m3fn)
SA = {"MG_colmajor": sc.t().contiguous().t(), "MG_contig": sc.contiguous(), "GM_contig": sc.t().contiguous()}
SB = {
    "NG_colmajor(s.t())": s.t(),
    "NG_contig": s.t().contiguous(),
    "GN_contig(s)": s.contiguous(),
    "GN_colmajor": s.t().contiguous().t(),
}
shown = set()
for an, sa in SA.items():
    for bn, sb in SB.items():
        for od in (torch.bfloat16, torch.float16):
            try:
                y = torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=od)
                torch.cuda.synchronize()
                err = ((y.float() - ref).norm() / ref.norm()).item()
                t = graph_time(
                    [lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=od)], reps=10
                )
                print(f"OK   a={an} b={bn} out={od}: relerr {err:.4f}, {t * 1e6:.1f} us", flush=True)
            except Exception as e:  # noqa: BLE001
                msg = str(e)
                key = msg[:80]
                print(f"FAIL a={an} b={bn} out={od}: " + (msg if key not in shown else key), flush=True)
                shown.add(key)
try:
    from torch.nn.functional import ScalingType, SwizzleType, scaled_mm

    print("v2 API present", ScalingType.__members__.keys())
    for sa, sb in ((sc.t().contiguous().t(), s.t()), (sc, s.t().contiguous()), (sc, s)):
        for od in (torch.bfloat16, torch.float16):
            try:
                y = scaled_mm(
                    a8,
                    b8.t(),
                    sa,
                    ScalingType.BlockWise1x128,
                    sb,
                    ScalingType.BlockWise1x128,
                    swizzle_a=SwizzleType.NO_SWIZZLE,
                    swizzle_b=SwizzleType.NO_SWIZZLE,
                    output_dtype=od,
                )
                torch.cuda.synchronize()
                err = ((y.float() - ref).norm() / ref.norm()).item()
                print(
                    f"v2 OK sa{tuple(sa.stride())} sb{tuple(sb.stride())} {od}: relerr {err:.4f}", flush=True
                )
            except Exception as e:  # noqa: BLE001
                print(
                    f"v2 FAIL sa{tuple(sa.stride())} sb{tuple(sb.stride())} {od}: {str(e)[:600]}", flush=True
                )
except Exception as e:  # noqa: BLE001
    print("v2 API:", type(e).__name__, e)
