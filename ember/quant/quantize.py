"""Quantize stage: sequential GPTQ with the allocated settings, layer by layer, resumable.

Each linear's Hessian comes from inputs computed with everything before it already quantized (earlier
layers and, inside a layer, qkv -> o -> gate_up -> down): the "quantized inputs feed the next" rule, so
later layers correct for the errors of earlier ones. After each layer its packed tensors and the hidden
states after it are checkpointed; a rerun starts at the first layer without a checkpoint. The LM head is
last, on the final norm of the quantized model's hidden states.

Test hook: EMBER_CONVERT_CRASH=quantize:I raises in the middle of layer I (after its first linear), the
way a killed run stops."""
from __future__ import annotations

import os
import sys

import torch
from tqdm import tqdm

from ember.quant.candidates import Candidate, head_candidates
from ember.quant.format import QuantizedTensor, dequantize
from ember.quant.gptq import gptq_quantize
from ember.quant.job import Job
from ember.quant.measure import embed_rows, measure_linear
from ember.quant.runner import LayerRunner

HEAD = "lm_head"


class SimulatedCrash(RuntimeError):
    """Raised by the EMBER_CONVERT_CRASH test hook."""


def _crash_point(stage: str, layer: int) -> bool:
    return os.environ.get("EMBER_CONVERT_CRASH") == f"{stage}:{layer}"


def quantize_linear(lin, H: torch.Tensor, cand: Candidate) -> tuple[QuantizedTensor, float]:
    """GPTQ one Linear in place: returns (packed tensor, relative error) and puts the dequantized weight
    into the module, so what follows sees the quantized layer."""
    W = lin.weight
    r = gptq_quantize(W, H, [cand.spec(W.shape[1])], want_codes=True)[0]
    qt = r.qt
    if lin.bias is not None:
        qt.bias = lin.bias.detach().to("cpu", torch.float16)
    W.copy_(dequantize(qt.to(W.device), torch.float32).to(W.dtype))
    return qt, r.rel_error


def _layer_file(i: int) -> str:
    return f"layer_{i:03d}.safetensors"


def quantize_layers(job: Job, folder: str, model, runner: LayerRunner, tokens: torch.Tensor,
                    plan: dict[str, Candidate], head_bits: int, progress: bool = True) -> None:
    """Fill `folder` with layer_NNN.safetensors (packed linears, errors in the metadata) and, unless
    head_bits is 16, head.safetensors. Resumes from folder/state.safetensors."""
    layers = model.model.layers
    state = f"{folder}/state.safetensors"
    meta = job.read_meta(state)
    start = int(meta["next_layer"]) if meta else 0
    h = job.read_tensors(state)["h"].to(runner.device) if meta else embed_rows(model, tokens, runner.device)
    bar = tqdm(total=len(layers), initial=start, desc="quantize", unit="layer", file=sys.stderr,
               disable=not progress)
    for i in range(start, len(layers)):
        tensors, errors = {}, {}

        def quantize(name: str, H: torch.Tensor, i=i, tensors=tensors, errors=errors) -> None:
            full = f"model.layers.{i}.{name}"
            qt, err = quantize_linear(layers[i].get_submodule(name), H, plan[full])
            tensors.update(qt.state_dict(full))
            errors[full] = err
            if _crash_point("quantize", i):
                raise SimulatedCrash(f"EMBER_CONVERT_CRASH: stopped in layer {i}")

        with torch.no_grad():
            runner.sequential_pass(layers[i], h, quantize)
        job.write_tensors(f"{folder}/{_layer_file(i)}", tensors, {"errors": errors})
        job.write_tensors(state, {"h": h}, {"next_layer": i + 1})
        bar.update(1)
    bar.close()
    if head_bits != 16 and job.read_meta(f"{folder}/head.safetensors") is None:
        H = runner.head_hessian(model.model.norm, h)
        qt, err, name = quantize_head(model.lm_head.weight, H, head_bits)
        job.write_tensors(f"{folder}/head.safetensors", qt.state_dict(HEAD), {"errors": {HEAD: err},
                                                                             "candidate": name})


@torch.no_grad()
def quantize_head(W: torch.Tensor, H: torch.Tensor, bits: int) -> tuple[QuantizedTensor, float, str]:
    """GPTQ of the head at `bits` with the head candidate (rotation or not, group 64 or 128) of least
    Hessian error, chosen on a row subset as the measure stage does. Returns (packed, rel. error, name)."""
    cands = head_candidates(bits)
    scored = measure_linear(W, H, cands)["candidates"]
    best = min(range(len(cands)), key=lambda c: scored[c]["error"])
    r = gptq_quantize(W, H, [cands[best].spec(W.shape[1])], want_codes=True)[0]
    return r.qt, r.rel_error, cands[best].name


def load_results(job: Job, folder: str, n_layers: int, head_bits: int) -> tuple[dict, dict]:
    """(tensors by name, {"errors": {linear: rel error}, "head_candidate": name}) from the checkpoints."""
    tensors, errors, extra = {}, {}, {}
    files = [_layer_file(i) for i in range(n_layers)] + (["head.safetensors"] if head_bits != 16 else [])
    for f in files:
        t = job.read_tensors(f"{folder}/{f}")
        meta = job.read_meta(f"{folder}/{f}")
        if t is None or meta is None:
            raise RuntimeError(f"quantize checkpoint {folder}/{f} is missing; rerun the conversion")
        tensors.update(t)
        errors.update(meta["errors"])
        if "candidate" in meta:
            extra["head_candidate"] = meta["candidate"]
    return tensors, {"errors": errors, **extra}

