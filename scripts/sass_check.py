"""Offline sm_90 check of the quantized-matmul kernel, no GPU needed: compile `qmatmul_kernel` for an H100
with Triton's bundled ptxas, then report registers, the SASS of its loops (instruction count and most common
ops) and the kinds of global loads in the PTX (are the weight words still loaded as v4?).

    PYTHONPATH=. .venv/bin/python scripts/sass_check.py --bits 4 --epi norm,glu
    PYTHONPATH=/tmp/t36site:. .venv/bin/python scripts/sass_check.py ...   # with the device's Triton 3.6

(for the device's exact Triton: `pip download --no-deps --only-binary=:all: --python-version 3.11 -d /tmp/t36
triton==3.6.0` and unzip the wheel into /tmp/t36site). Counts compare variants of the kernel; only the GPU
says which is faster (docs/dev/qmatmul-notes.md has the history)."""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ember.kernels.qmatmul_kernels import qmatmul_kernel

SIGNATURE = {
    "x_ptr": "*fp16", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "perm_ptr": "*i32", "meta_ptr": "*i32",
    "out_ptr": "*fp16", "buf_ptr": "*fp32", "ibuf_ptr": "*i32", "cnt_ptr": "*i32", "M": "i32", "N": "i32",
    "stride_xm": "i32", "stride_om": "i32", "ones": "i32", "ss_in_ptr": "*fp32", "eps": "fp32",
    "res_ptr": "*fp16", "stride_rm": "i32", "gamma_ptr": "*fp16", "ss_out_ptr": "*fp32",
    "u_tiles": "i32", "u_kt": "i32", "u_g": "i32", "u_bits": "i32",
}
# what the JIT assumes of tensors and of ints divisible by 16 (pointers, N, strides)
ALIGNED = [i for i, n in enumerate(SIGNATURE) if SIGNATURE[n].startswith("*") or n in ("N", "stride_xm",
                                                                                      "stride_om", "stride_rm")]


def compile_kernel(args) -> tuple[str, str, str, int]:
    widths = sum(1 << int(b) for b in args.bits.split(","))
    epi = set(args.epi.split(",")) if args.epi else set()
    const = dict(BM=16 if args.dot else 1, BN=args.bn, WIDTHS=widths, USE_DOT=args.dot, HAS_ZEROS=args.zeros,
                 HAS_PERM=args.zeros, HAS_G32=args.zeros, ATOMIC=args.splits, DOT_DT=tl.float16, PDL=args.pdl,
                 H2=0 if args.dot else args.h2, NORM_IN="norm" in epi, RESID="resid" in epi, GLU="glu" in epi,
                 STAGES=args.stages, EVEN_N=args.even, EPI_EARLY=args.epi_early, UNIFORM=args.uniform)
    sig = dict(SIGNATURE, **{k: "constexpr" for k in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i in ALIGNED}
    k = triton.compile(ASTSource(fn=qmatmul_kernel, signature=sig, constexprs=const, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": args.warps, "num_stages": 2, "launch_pdl": bool(args.pdl),
                                **({"maxnreg": args.maxnreg} if args.maxnreg else {})})
    sass, res = disassemble(k.asm["cubin"])
    return k.asm["ptx"], sass, res, k.metadata.shared  # shared: bytes per program, dynamic included


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(SASS, resource usage) of a compiled kernel, by the nvdisasm and cuobjdump that ship with Triton."""
    tools = os.path.join(os.path.dirname(__import__("triton.backends.nvidia").backends.nvidia.__file__), "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    return sass, res


def loops(sass: str) -> list[tuple[int, list, str]]:
    """(instructions, most common ops, where the global loads sit) of each backward branch's body. The last:
    how many loads come before the first FP16/FP32 multiply-add (HFMA2, FFMA) and how many after it; in the
    one-row loop those after it wait for a round trip each (docs/dev/qmatmul-notes.md, sixth session)."""
    lines = sass.splitlines()
    labels = {ln.strip()[:-1]: i for i, ln in enumerate(lines) if re.match(r"\s*\.L_x_\d+:", ln)}
    out = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", ln)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)]:i + 1] if re.search(r"/\*[0-9a-f]{4}\*/", x)]
            names = [re.sub(r"^@!?U?P\w+ ", "", x.split("*/")[1].strip()).split()[0].split(".")[0] for x in body]
            first = next((k for k, n in enumerate(names) if n in ("HFMA2", "FFMA")), len(names))
            before = sum(n in ("LDG", "LDGSTS") for n in names[:first])
            after = sum(n in ("LDG", "LDGSTS") for n in names[first:])
            out.append((len(body), collections.Counter(names).most_common(6),
                        f"global loads before the first multiply-add {before}, after it {after}"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", default="4", help="widths present, e.g. 4 or 5,4,3 (default 4)")
    p.add_argument("--h2", type=int, default=2, help="packed-half decode: 2 PTX, 0 off (default 2)")
    p.add_argument("--pdl", type=int, default=2, help="PDL mode 0/1/2 (default 2)")
    p.add_argument("--epi", default="", help="fused epilogue steps: norm, resid, glu (comma separated)")
    p.add_argument("--bn", type=int, default=512, help="columns per program (default 512)")
    p.add_argument("--warps", type=int, default=4, help="warps per program (default 4)")
    p.add_argument("--stages", type=int, default=1, help="pipelining depth of the one-row loop (default 1: none)")
    p.add_argument("--zeros", action="store_true", help="asymmetric zeros, permutation and groups of 32")
    p.add_argument("--dot", action="store_true", help="the multi-row tl.dot path (16-row tiles)")
    p.add_argument("--even", action="store_true", help="N a multiple of the column block (no column masks)")
    p.add_argument("--epi-early", action="store_true", help="the epilogue's operands loaded before the atomics")
    p.add_argument("--uniform", action="store_true", help="one segment: split metadata computed, not read")
    p.add_argument("--no-split", dest="splits", action="store_false", help="one split: direct store, no atomics")
    p.add_argument("--maxnreg", type=int, default=0, help="register cap per thread (Triton's maxnreg; 0: none)")
    p.add_argument("--dump", help="also write the whole SASS to this file")
    args = p.parse_args()
    ptx, sass, res, shared = compile_kernel(args)
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(sass)
    regs = re.search(r"REG:(\d+)", res)
    print(f"triton {triton.__version__}, sm_90: registers {regs.group(1) if regs else '?'}, shared memory "
          f"{shared} bytes")
    print("global loads in the PTX:", dict(collections.Counter(re.findall(r"ld\.global[\.\w]*", ptx))))
    for n, ops, loads in loops(sass):
        print(f"loop: {n} SASS instructions; {ops}; {loads}")


if __name__ == "__main__":
    main()
