"""`ember convert INPUT OUTPUT --bpw B`: mixed-bitrate GPTQ conversion into the ember format.

Stages over a resumable job folder (ember/quant/job.py), each skipped when its result is already there:
  calibrate  calibration text -> token rows                          (calibrate.py)
  measure    per linear: error and exact size of every candidate      (measure.py, candidates.py)
  allocate   one candidate per linear, least predicted KL within budget (allocate.py)
  quantize   sequential GPTQ with the chosen settings                 (quantize.py, gptq.py)
  write      config, tokenizer, shards, manifest                      (write.py)

Python: `convert(input, output, bpw, ...) -> manifest dict`."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from ember.errors import ConfigError
from ember.io.source import open_source
from ember.quant.allocate import allocate
from ember.quant.calibrate import calibrate, default_files
from ember.quant.candidates import CANDIDATES, Candidate, min_max_bpw
from ember.quant.format import FORMAT_VERSION, write_manifest
from ember.quant.gptq import DAMP, block_size
from ember.quant.job import Job, key_of
from ember.quant.measure import measure
from ember.quant.model_io import check_shapes, linear_shapes, load_float_model, source_identity
from ember.quant.quantize import HEAD, load_results, quantize_layers
from ember.quant.report import build_manifest, collect_tensors, summary
from ember.quant.runner import LayerRunner
from ember.quant.write import write_folder

log = logging.getLogger("ember")
STAGES = ("calibrate", "measure", "allocate", "quantize", "write")
DEFAULT_ROWS = {"cpu": 64, "cuda": 128}
DEFAULT_ROW_LEN = 512
MIN_ROWS = 8
HEAD_BITS = (6, 8, 16)


def objective(cand: dict) -> float:
    """What the allocator minimizes per linear: the candidate's predicted KL contribution (measure.py);
    the relative Hessian error when the measurement has none."""
    return cand["dkl"] if "dkl" in cand else cand["rel_error"]


def stage_allocate(job: Job, meas: dict, bpw: float) -> tuple[dict[str, Candidate], dict]:
    """The chosen candidate per decoder linear for target `bpw` (cached per measurement and target)."""
    names = sorted(meas["linears"], key=_layer_order)
    lins = [meas["linears"][n] for n in names]
    key = key_of({"measure": meas["key"], "bpw": bpw})
    cached = job.read_json(f"alloc-{key}.json")
    if cached is None:
        costs = [[c["bits"] for c in lin["candidates"]] for lin in lins]
        errors = [[objective(c) for c in lin["candidates"]] for lin in lins]
        budget = int(bpw * sum(lin["n"] * lin["k"] for lin in lins))
        pick = allocate(costs, errors, budget)
        cached = {"key": key, "target_bpw": bpw, "choice": {n: lins[i]["candidates"][p]["name"]
                                                            for i, (n, p) in enumerate(zip(names, pick))}}
        job.write_json(f"alloc-{key}.json", cached)
    by_name = {c.name: c for c in CANDIDATES}
    return {n: by_name[c] for n, c in cached["choice"].items()}, cached


def _layer_order(name: str) -> tuple:
    parts = name.split(".")
    return (int(parts[2]), name) if len(parts) > 2 and parts[2].isdigit() else (1 << 30, name)


def _resolve_device(device: str | None) -> torch.device:
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def convert(input: str | Path, output: str | Path, bpw: float, head_bits: int = 6,
            calibration: list[str | Path] | None = None, device: str | None = None, rows: int | None = None,
            row_len: int | None = None, job_dir: str | Path | None = None, stop_after: str | None = None,
            progress: bool = True) -> dict | None:
    """Convert a model (HF folder, GGUF file, GPTQ or ember folder) to `output` at about `bpw` bits per
    weight over the decoder's linears. Returns the manifest (None when stopped early by stop_after)."""
    if head_bits not in HEAD_BITS:
        raise ConfigError(f"--head-bits {head_bits} is not supported (choose from {HEAD_BITS})")
    if stop_after is not None and stop_after not in STAGES:
        raise ConfigError(f"unknown stage {stop_after!r} (stages: {', '.join(STAGES)})")
    times: dict[str, float] = {}
    t = time.perf_counter()
    src = open_source(input)
    cfg = src.config
    shapes = linear_shapes(cfg)
    check_shapes(shapes)
    lo, hi = min_max_bpw([s for n, s in shapes.items() if n != HEAD])
    if not lo <= bpw <= hi:
        raise ConfigError(f"--bpw {bpw:g} is outside what the quantization candidates reach for this model: "
                          f"from {lo:.3f} to {hi:.3f} bits per weight")
    dev = _resolve_device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    row_len = row_len or DEFAULT_ROW_LEN
    files = [Path(f) for f in calibration] if calibration else default_files()
    job = Job(job_dir or Path(output) / ".job")
    ident = {"source": source_identity(src.path), "device": dev.type, "dtype": str(dtype)}

    # 1. calibrate
    tok = src.tokenizer()
    ckey = key_of({**ident, "files": [str(f) for f in files], "rows": rows, "row_len": row_len})
    meta = job.read_meta("calibrate.safetensors")
    if meta and meta.get("key") == ckey:
        tokens, calib = job.read_tensors("calibrate.safetensors")["tokens"], meta["info"]
    else:
        cal = calibrate(tok, files, rows, row_len, max_rows=DEFAULT_ROWS[dev.type], min_rows=MIN_ROWS)
        tokens, calib = cal.tokens, cal.info()
        job.write_tensors("calibrate.safetensors", {"tokens": tokens}, {"key": ckey, "info": calib})
    log.info("calibration: %d rows x %d tokens from %d file(s) (%d tokens available)", calib["rows"],
             calib["row_len"], len(calib["files"]), calib["available_tokens"])
    times["calibrate"] = time.perf_counter() - t
    if stop_after == "calibrate":
        return None

    # 2. measure
    t = time.perf_counter()
    model = load_float_model(src, dev, dtype, row_len, progress)
    runner = LayerRunner(cfg, tokens.shape[0], tokens.shape[1], dev, dtype)
    mkey = key_of({**ident, "calibration": calib["sha256"], "tokens": key_of(tokens.tolist()),
                   "candidates": [c.name for c in CANDIDATES], "damp": DAMP, "version": 2,
                   "block": block_size(dev)})
    meas = measure(job, mkey, model, runner, tokens, CANDIDATES, progress)
    times["measure"] = time.perf_counter() - t
    if stop_after == "measure":
        return None

    # 3. allocate
    t = time.perf_counter()
    plan, alloc = stage_allocate(job, meas, bpw)
    times["allocate"] = time.perf_counter() - t
    if stop_after == "allocate":
        return None

    # 4. quantize
    t = time.perf_counter()
    # the stage stores packed tensors: a job begun under another format version must quantize again
    qkey = key_of({"measure": mkey, "choice": alloc["choice"], "head_bits": head_bits, "version": 1,
                   "format": FORMAT_VERSION})
    folder = f"quant-{qkey}"
    job.check_key(folder, qkey)
    quantize_layers(job, folder, model, runner, tokens, plan, head_bits, progress)
    qtensors, qinfo = load_results(job, folder, cfg.num_layers, head_bits)
    times["quantize"] = time.perf_counter() - t
    if stop_after == "quantize":
        return None

    # 5. write
    t = time.perf_counter()
    tensors = collect_tensors(model, cfg, qtensors, head_bits)
    manifest = build_manifest(cfg, qtensors, qinfo, meas, alloc, head_bits, bpw, str(input), calib,
                              block_size(dev))
    write_folder(output, src, tensors, manifest)
    job.remove(folder)
    times["write"] = time.perf_counter() - t
    manifest["converter"]["times"] = {k: round(v, 2) for k, v in times.items()}
    write_manifest(Path(output), manifest)  # again, now with the write stage's time
    if progress:
        print(summary(manifest), file=sys.stderr)
    return manifest


def cmd_convert(args) -> int:
    inp, out = args.input or args.model, args.output or args.out
    if not inp or not out:
        raise ConfigError("ember convert needs the INPUT model and the OUTPUT folder "
                          "(ember convert INPUT OUTPUT --bpw B, or --model INPUT --out OUTPUT)")
    convert(inp, out, args.bpw, head_bits=args.head_bits, calibration=args.calibration,
            device=args.device, rows=args.rows, row_len=args.row_len, job_dir=args.job_dir,
            stop_after=args.stop_after, progress=not args.quiet)
    return 0


def add_cli(subparsers, common) -> None:
    p = subparsers.add_parser(
        "convert", help="quantize a model to the ember format at a target bits per weight",
        description="Mixed-bitrate GPTQ: measures every linear under candidate settings, allocates bits to "
                    "minimize the predicted KL divergence at --bpw, quantizes layer by layer. Resumable: rerun the same command "
                    "after an interruption (state in OUTPUT/.job or --job-dir; reuse one job folder to "
                    "convert the same model at several --bpw without measuring again).")
    p.add_argument("input", nargs="?", help="HF folder, .gguf file, GPTQ or ember folder")
    p.add_argument("output", nargs="?", help="folder to write the converted model to")
    p.add_argument("--model", default=None, help="the input, as a flag (same as INPUT)")
    p.add_argument("--out", default=None, help="the output folder, as a flag (same as OUTPUT)")
    p.add_argument("--bpw", type=float, required=True, help="target bits per weight of the decoder's linears")
    p.add_argument("--head-bits", type=int, default=6, choices=HEAD_BITS, help="LM head width (default: 6)")
    p.add_argument("--calibration", nargs="+", default=None, metavar="FILE",
                   help="calibration text files (default: ember's bundled texts)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--rows", type=int, default=None,
                   help=f"calibration rows (default: up to {DEFAULT_ROWS['cpu']} on CPU, "
                        f"{DEFAULT_ROWS['cuda']} on GPU, as the text allows)")
    p.add_argument("--row-len", type=int, default=None, help=f"tokens per row (default: {DEFAULT_ROW_LEN})")
    p.add_argument("--job-dir", default=None, help="job folder (default: OUTPUT/.job)")
    p.add_argument("--stop-after", default=None, choices=STAGES, help="stop after this stage")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    p.set_defaults(func=cmd_convert)

