"""Measure stage: for every decoder linear, the error and exact size of each candidate setting.

Layer by layer on the float model (only the current hidden states (rows, L, H) are kept), each linear's
input Hessian is collected and the linear is quantized with GPTQ under every candidate. GPTQ treats output
rows independently (a row's error only ever updates that row), so the error is measured on an evenly
spaced subset of at most MEASURE_ROWS output rows and scaled up: an unbiased estimate at a fraction of the
cost (on SmolLM2-135M the relative error from 384 rows was within ~2% of the full matrix's). The stored
size is exact, from the spec and the full shape. The measurement does not depend on the target bpw, so
one measurement serves every --bpw of the same model and calibration. Each candidate's error is also
turned into a predicted KL contribution with the output Fisher of its linear (fisher.py), the quantity the
allocator minimizes."""
from __future__ import annotations

import sys
from collections import defaultdict

import torch
from tqdm import tqdm

from ember.quant.candidates import Candidate
from ember.quant.fisher import output_fisher
from ember.quant.gptq import gptq_quantize
from ember.quant.job import Job
from ember.quant.runner import LINEARS, LayerRunner

MEASURE_ROWS = 512
FISHER_ROWS = 16  # calibration rows of the Fisher pass (forward + backward of the whole model)


def row_subset(n: int, limit: int = MEASURE_ROWS) -> torch.Tensor:
    """Evenly spaced output rows (all of them when n <= limit)."""
    m = min(n, limit)
    return (torch.arange(m) * n) // m


@torch.no_grad()
def measure_linear(W: torch.Tensor, H: torch.Tensor, cands: tuple[Candidate, ...],
                   fisher: torch.Tensor | None = None, tokens: int = 1) -> dict:
    """{"n", "k", "base": tr(W H W^T), "candidates": [{name, bits, bpw, error, rel_error[, dkl]}]} for W
    (N, K) with Hessian H summed over `tokens` tokens. With the output Fisher f (N,) (fisher.py) each
    candidate also gets dkl = 1/2 sum_n f_n (dW H dW^T)_nn / tokens, its predicted KL contribution."""
    N, K = W.shape
    W = W.float()
    rows_idx = row_subset(N)
    sub = W[rows_idx.to(W.device)]
    scale = N / sub.shape[0]
    f_sub = None if fisher is None else fisher.double()[rows_idx]
    by_had: dict[int, list[int]] = defaultdict(list)
    specs = [c.spec(K) for c in cands]
    for i, s in enumerate(specs):
        by_had[s.had].append(i)
    rows: list[dict | None] = [None] * len(cands)
    for had in sorted(by_had):
        idx = by_had[had]
        for i, r in zip(idx, gptq_quantize(sub, H, [specs[i] for i in idx])):
            rows[i] = {"name": cands[i].name, "bits": specs[i].stored_bits(N), "bpw": specs[i].bpw(N),
                       "error": r.error * scale, "rel_error": r.rel_error}
            if f_sub is not None:
                rows[i]["dkl"] = 0.5 * float((f_sub * r.row_errors).sum()) * scale / tokens
    base = float(((W @ H.float()) * W).sum())
    return {"n": N, "k": K, "base": base, "candidates": rows}


@torch.no_grad()
def embed_rows(model, tokens: torch.Tensor, device) -> torch.Tensor:
    """h (rows, L, H): the embeddings of the calibration tokens, the first layer's input."""
    t = tokens.to(device)
    return model.model.embed_tokens(t.reshape(-1)).reshape(*t.shape, -1).clone()


def measure(job: Job, key: str, model, runner: LayerRunner, tokens: torch.Tensor,
            cands: tuple[Candidate, ...], progress: bool = True) -> dict:
    """Run (or resume) the measure stage; returns {"key", "linears": {full name: measure_linear(...)}}.
    NOTE: runs on the float model and leaves its weights untouched."""
    done = job.read_json("measure.json")
    if done is not None and done.get("key") == key:
        return done
    job.check_key("measure", key)
    layers = model.model.layers
    fisher = job.read_tensors("measure/fisher.safetensors")
    if fisher is None:  # a few rows suffice for the per-row averages
        sub = tokens[row_subset(tokens.shape[0], FISHER_ROWS)]
        fisher = output_fisher(model, sub, runner.device)
        job.write_tensors("measure/fisher.safetensors", fisher)
    n_tok = tokens.numel()
    meta = job.read_meta("measure/state.safetensors")
    start = int(meta["next_layer"]) if meta else 0
    h = job.read_tensors("measure/state.safetensors")["h"].to(runner.device) if meta else \
        embed_rows(model, tokens, runner.device)
    bar = tqdm(total=len(layers), initial=start, desc="measure", unit="layer", file=sys.stderr,
               disable=not progress)
    for i in range(start, len(layers)):
        Hs = runner.float_pass(layers[i], h)
        res = {}
        for n in LINEARS:
            full = f"model.layers.{i}.{n}"
            res[full] = measure_linear(layers[i].get_submodule(n).weight, Hs[n], cands, fisher[full], n_tok)
        del Hs
        job.write_json(f"measure/layer_{i:03d}.json", res)
        job.write_tensors("measure/state.safetensors", {"h": h}, {"next_layer": i + 1})
        bar.update(1)
    bar.close()
    linears: dict = {}
    for i in range(len(layers)):
        linears.update(job.read_json(f"measure/layer_{i:03d}.json"))
    out = {"key": key, "linears": linears}
    job.write_json("measure.json", out)
    job.remove("measure")
    return out
