"""Round-to-nearest conversion of a whole model into the ember format: the baseline the GPTQ converter is
scored against (`python -m ember.quant.rtn_convert INPUT OUTPUT --bits B [--group-size G]`).

The folder is written by the converter's own write stage (ember/quant/write.py, docs/format.md): config.json,
tokenizer files, safetensors shards (+ index) holding 16-bit embeddings and norms and the quantized fused
linears qkv_proj, o_proj, gate_up_proj, down_proj and lm_head, and the ember_quant.json manifest (with
"converter": {"method": "rtn", ...}). No calibration data is used. `--bits 16` writes a plain float16 HF
folder instead (a GGUF's reference that loads without dequantizing it again)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ember.errors import ConfigError
from ember.io.source import open_source
from ember.quant.format import PLANES, QuantizedTensor, dequantize
from ember.quant.rtn import rtn_quantize
from ember.quant.write import source_config, write_folder, write_tokenizer

# ember name -> the HF shards whose rows it concatenates (docs/format.md, "Which tensors are quantized")
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def fit_group(group_size: int, k: int) -> int:
    """The requested group size if it divides K, else the largest of 128, 64, 32 that does (SmolLM2's
    o_proj has K = 576, which 128 does not divide); -1 means one group of all K inputs."""
    if k % 64:
        raise ConfigError(f"in_features {k} is not a multiple of 64, which the ember format needs")
    if group_size == -1:
        return k
    for g in (group_size, 128, 64, 32):
        if g <= group_size and k % g == 0 and (g == 32 or g % 64 == 0):
            return g
    raise ConfigError(f"no group size <= {group_size} among 128/64/32 divides in_features {k}")


def layer_entry(qt: QuantizedTensor, W: torch.Tensor) -> dict:
    """Manifest record of one linear (the keys the converter writes); `error` is the relative Frobenius
    error of the dequantized weight: RTN has no calibration inputs to measure an output error with."""
    err = (dequantize(qt, torch.float32) - W.float()).norm() / W.float().norm().clamp_min(1e-30)
    segs = [row[:4] for row in qt.segments.tolist()]
    return {"shape": [qt.out_features, qt.in_features], "segments": segs, "had": qt.had, "act_order": False,
            "zeros": qt.qzeros is not None, "bpw": qt.bpw(), "error": float(err)}


def dense_export(inp: str | Path, out: str | Path) -> None:
    """Write `inp` (e.g. a GGUF) as a plain float16 HF folder: a reference that loads in a second."""
    src, out = open_source(inp), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(source_config(src), indent=2) + "\n")
    write_tokenizer(src, out)
    tensors = {n: src.tensors.get(n).half().contiguous() for n in src.tensors.names()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def rtn_convert(inp: str | Path, out: str | Path, bits: int, group_size: int = 128, head_bits: int = 6,
                sym: bool = True, had: int = 0, device: str = "cpu", progress: bool = False) -> dict:
    """Convert `inp` (HF folder or .gguf) to an ember folder at `out` with the converter's writer
    (ember/quant/write.py); returns the manifest."""
    if bits not in PLANES or head_bits not in (*PLANES, 16):
        raise ConfigError(f"--bits must be one of {sorted(PLANES)} (got {bits}) and --head-bits one of "
                          f"{sorted(PLANES)} or 16 (got {head_bits})")
    t0 = time.perf_counter()
    src = open_source(inp)
    cfg = src.config
    if cfg.attention_bias or cfg.mlp_bias:
        raise ConfigError("the RTN baseline does not handle linear biases; use `ember convert`")
    half = lambda n: src.tensors.get(n).to(torch.float16).contiguous()
    tensors, layers = {"model.embed_tokens.weight": half("model.embed_tokens.weight")}, {}

    def quantize(name: str, W: torch.Tensor, b: int) -> QuantizedTensor:
        W = W.to(device)
        qt = rtn_quantize(W, b, fit_group(group_size, W.shape[1]), sym=sym, had=had)
        tensors.update({k: v.cpu() for k, v in qt.state_dict(name).items()})
        layers[name] = layer_entry(qt, W)
        return qt

    bits_dec = weights_dec = 0
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        for n in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{n}.weight"] = half(f"{p}.{n}.weight")
        for fused, parts in FUSED.items():
            W = torch.cat([src.tensors.get(f"{p}.{s}.weight").float() for s in parts], 0)  # (N, K)
            bits_dec += quantize(f"{p}.{fused}", W, bits).stored_bits()
            weights_dec += W.numel()
        if progress:
            print(f"layer {i + 1}/{cfg.num_layers} done", file=sys.stderr)
    tensors["model.norm.weight"] = half("model.norm.weight")
    head = src.tensors.get("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    if head_bits == 16:
        head_stored = 16 * head.numel()
        if not cfg.tie_word_embeddings:
            tensors["lm_head.weight"] = head.to(torch.float16).contiguous()
    else:
        head_stored = quantize("lm_head", head.float(), head_bits).stored_bits()
    manifest = {
        "bpw": bits_dec / weights_dec,
        "bpw_total": (bits_dec + head_stored) / (weights_dec + head.numel()),
        "head_bits": head_bits, "target_bpw": None, "source": str(inp), "calibration": None,
        "layers": layers,
        "converter": {"method": "rtn", "bits": bits, "group_size": group_size, "sym": sym, "had": had,
                      "error": "relative Frobenius error of the dequantized weight",
                      "times": {"total": round(time.perf_counter() - t0, 2)}},
    }
    write_folder(out, src, tensors, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Round-to-nearest baseline: quantize every decoder linear of "
                                 "INPUT to --bits and write an ember-format folder OUTPUT.")
    ap.add_argument("input", help="HF folder or .gguf file")
    ap.add_argument("output", help="folder to write")
    ap.add_argument("--bits", type=int, required=True, help=f"bits per weight code, one of {sorted(PLANES)}; "
                    "16 writes a plain float16 HF folder (no quantization)")
    ap.add_argument("--group-size", type=int, default=128, help="inputs per scale (falls back to 64/32 where "
                    "it does not divide a matrix; -1: one group per row); default 128")
    ap.add_argument("--head-bits", type=int, default=6, help="bits of lm_head (16: fp16); default 6")
    ap.add_argument("--asym", action="store_true", help="asymmetric (stored zero points) instead of symmetric")
    ap.add_argument("--had", type=int, default=0, help="block Hadamard rotation size (0: none)")
    ap.add_argument("--device", default="cpu", help="where to quantize (cpu or cuda)")
    a = ap.parse_args(argv)
    if a.bits == 16:
        dense_export(a.input, a.output)
        print(f"wrote {a.output}: float16")
        return 0
    try:
        m = rtn_convert(a.input, a.output, a.bits, a.group_size, a.head_bits, not a.asym, a.had, a.device,
                        progress=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output}: bpw {m['bpw']:.3f} (with head {m['bpw_total']:.3f}) in "
          f"{m['converter']['times']['total']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
