"""`ember bench`: speed of a synthetic model of a real shape (random quantized weights built on the GPU) or
of a real model folder. A table for people; --json makes the last stdout line one JSON object."""
from __future__ import annotations

import datetime
import json
import os

import torch

from ember.bench.synthetic import SHAPES, build_synthetic, decoder_bpw, stored_weight_bytes


def cmd_bench(args) -> int:
    from ember.llm import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.synthetic:
        model = build_synthetic(args.synthetic, args.bpw, args.head_bits, device,
                                max_positions=args.prompt_len + args.gen_len + 64, act_order=args.act_order)
        name, bpw = args.synthetic, args.bpw
    else:  # weights only: a speed run needs no tokenizer (random GPTQ checkpoints ship none)
        from ember.io.source import open_source
        from ember.llm import QUANTIZED, resolve_dtype
        from ember.models.loader import build_model
        from ember.quant.load import quant_hook_for

        src = open_source(args.model)
        dtype = resolve_dtype(None, device, src.config.torch_dtype, src.format in QUANTIZED)
        model = build_model(src.config, src.tensors, device, dtype, args.prompt_len + args.gen_len + 64,
                            where=str(args.model), progress=not args.quiet,
                            quant_hook=quant_hook_for(src.format, src.config.quantization))
        name = str(args.model)
        q = src.config.quantization or {}
        bpw = decoder_bpw(model) if src.format in ("ember", "gptq") else 16
        bpw = round(bpw, 3) if bpw == bpw else q.get("bits")
    from ember.bench.speed import measure

    fp8 = None
    if args.fp8_prefill:
        from ember.kernels.qmatmul_fp8 import fp8_gpu_ok
        from ember.layers.quant_linear import set_fp8_prefill

        if not fp8_gpu_ok(device):
            raise SystemExit("ember bench: --fp8-prefill needs a Hopper GPU (sm_90) and CUDA 12.9+")
        able, total = set_fp8_prefill(model, True)
        fp8 = f"{able}/{total}"
    wbytes = stored_weight_bytes(model)
    res = measure(model, device, args.prompt_len, args.gen_len, args.batch, wbytes, reps=args.reps,
                  use_graphs=False if args.no_graphs else None, max_seq_len=args.max_seq_len)
    if args.synthetic:
        bpw = round(decoder_bpw(model), 3)  # what is actually stored, not the request
    row = dict(model=name, bpw=bpw, head_bits=args.head_bits if args.synthetic else None, batch=args.batch,
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               prompt_len=args.prompt_len, gen_len=args.gen_len, max_seq_len=args.max_seq_len,
               weight_gib=wbytes / 2**30,
               dtype=str(_activation_dtype(model)).removeprefix("torch."),
               date=datetime.date.today().isoformat(), **res, **_switches(),
               fp8_prefill=fp8 or 0,  # "able/total" quantized linears on the fp8 path, or 0
               act_order=int(bool(args.synthetic and args.act_order)))
    if args.json:
        print(json.dumps(row))
    else:
        print(format_row(row))
    return 0


def _activation_dtype(model) -> torch.dtype:
    """The dtype activations run in: the floating-point parameters' (the packed-half decode needs float16)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _switches() -> dict:
    """The kernel switches this run asked for (README, GPU notes), so a row says what it measured; the
    packed-half decode (ember_h2) applies only where the row's dtype is float16."""
    from ember.engine.runner import async_decode, step_kernels
    from ember.kernels import ops
    from ember.kernels.attention_decode import EARLY_MERGE_SCALE, MIN_SPLIT_TOKENS, early_enabled
    from ember.kernels.qmatmul import (DEFAULTS, WIDE_STAGES, _epi_early, _even_n_on, _glu_on, _pdl_all,
                                       _preperm_on, _qgemm_on, _rotate_mm_on, _uniform_on, _use_tuned, gemv_maxnreg,
                                       mixed_maxnreg)
    from ember.kernels.qmatmul_kernels import ROW_SUM

    env = os.environ.get
    return dict(ember_fuse=int(ops.fuse_enabled()), ember_h2=int(env("EMBER_H2", "1") != "0"),
                ember_pdl=int(env("EMBER_PDL", "2")),
                ember_gemv_stages=int(env("EMBER_GEMV_STAGES") or DEFAULTS["gemv"][2]),
                ember_gemv_per_sm=int(env("EMBER_GEMV_PER_SM") or 0),  # 0: the launch tables' own
                ember_gemv_wide_stages=int(env("EMBER_GEMV_WIDE_STAGES") or WIDE_STAGES),
                ember_even_n=int(_even_n_on()), ember_async_decode=int(async_decode()),
                ember_attn_early=int(early_enabled()), ember_attn_min_split=MIN_SPLIT_TOKENS,
                ember_attn_merge_scale=EARLY_MERGE_SCALE, ember_epi_early=int(_epi_early()),
                ember_step_kernels=int(step_kernels()), ember_tuned=int(_use_tuned()),
                ember_pdl_all=int(_pdl_all()), ember_uniform=int(_uniform_on()),
                ember_row_sum=int(ROW_SUM.value),
                ember_gemv_maxnreg=gemv_maxnreg(),  # 0: none (mixed widths: the next)
                ember_mixed_maxnreg=mixed_maxnreg(),
                ember_preperm=int(_preperm_on()), ember_rotate_mm=int(_rotate_mm_on()),
                ember_qgemm=int(_qgemm_on()), ember_qgemm_glu=int(_glu_on()),
                ember_small_cfg=env("EMBER_SMALL_CFG") or "/".join(map(str, DEFAULTS["small"])))


def format_row(r: dict) -> str:
    """The human-readable report of one `measure` row."""
    head = f" ({r['head_bits']}-bit head)" if r.get("head_bits") else ""
    eager = f" (eager {r['prefill_eager_tok_s']:,.0f})" if r.get("prefill_graph") else ""
    fp8 = f" (fp8 matmuls: {r['fp8_prefill']} linears)" if r.get("fp8_prefill") else ""
    lines = [f"ember bench: {r['model']}, {r['bpw']} bpw{head}, batch {r['batch']}, {r['device']}",
             f"  prefill  {r['prompt_len']:>5} tok/seq  {r['prefill_tok_s']:>10,.0f} tok/s{eager}{fp8}",
             f"  decode   {r['gen_len']:>5} tok/seq  {r['decode_tok_s']:>10,.1f} tok/s  "
             f"({r['decode_ms_per_step']:.2f} ms/step)",
             f"  weights  {r['weight_gib']:.2f} GiB" + (f", peak VRAM {r['vram_gib']:.2f} GiB" if r['vram_gib'] else "")]
    if r.get("roofline_frac") is not None:
        lines.append(f"  roofline {100 * r['roofline_frac']:.0f}% of {r['copy_tb_s']:.2f} TB/s copy bandwidth "
                     f"({r['bytes_per_step'] / 1e9:.2f} GB read per step)")
    return "\n".join(lines)


def add_cli(sub, common) -> None:
    b = sub.add_parser("bench", help="measure prefill/decode speed, VRAM and roofline fraction on the GPU",
                       description="Speed of a synthetic model of a real shape (--synthetic, random quantized "
                       "weights at --bpw built directly on the GPU) or of a model folder (--model).")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", choices=sorted(SHAPES), help="model shape")
    src.add_argument("--model", help="HF / GPTQ / ember folder or .gguf file")
    b.add_argument("--bpw", type=float, default=4.0,
                   help="bits per weight of the synthetic decoder: within 0.25 of a width (2,3,4,5,6,8) the matrices "
                   "are uniform at it plus fp16 scales per 128 (4.0 -> 4.125 stored), else two widths are mixed "
                   "(default 4.0; the JSON reports the stored bpw)")
    b.add_argument("--act-order", action="store_true",
                   help="synthetic matrices in the converter's layout: input permutation, zero points, Hadamard "
                        "rotation (default: symmetric and unpermuted, like a plain GPTQ checkpoint)")
    b.add_argument("--head-bits", type=int, default=6, help="synthetic lm_head width; 16 = fp16 (default 6)")
    b.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per sequence (default 512)")
    b.add_argument("--gen-len", type=int, default=128, help="decoded tokens per sequence (default 128)")
    b.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    b.add_argument("--max-seq-len", type=int, default=None,
                   help="context each decode block table holds, as `generate --max-seq-len` (sets the decode "
                        "attention's split count; default: prompt + generated tokens)")
    b.add_argument("--reps", type=int, default=3, help="timed repetitions; the median is reported (default 3)")
    b.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    b.add_argument("--no-graphs", action="store_true", help="decode eagerly instead of through CUDA graphs")
    b.add_argument("--fp8-prefill", action="store_true",
                   help="prefill matmuls on FP8 tensor cores (Hopper; activations rounded to e4m3 per 128 values)")
    b.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    b.set_defaults(func=cmd_bench)
