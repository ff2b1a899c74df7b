"""How much each linear's output matters to the model's predictions: the diagonal Fisher information of the
next-token distribution with respect to every decoder linear's outputs.

For a small perturbation dy of the output of one linear, KL(p || p') ~= 1/2 E_t[(g_t . dy_t)^2] with
g_t = d log p(y_t) / d y_t at a label y_t sampled from the model itself (the true Fisher; one sample per
position). Keeping the diagonal and assuming g independent of the layer's input x:
    KL ~= 1/2 sum_n f_n (dW H dW^T)_nn / T,    f_n = mean_t g_tn^2,  H = sum_t x_t^T x_t over T tokens.
So a candidate's predicted KL is its per-output-row Hessian error weighted by f: one forward and backward
pass over a few calibration rows gives f for every linear, and the allocator then minimizes the summed
predicted KL instead of treating every linear's relative error alike.

The pass runs the model's plain-PyTorch reference ops (EMBER_NO_TRITON=1 while it runs: the Triton kernels
have no backward), in chunks of rows; parameters stay frozen, gradients flow through activations only."""
from __future__ import annotations

import math
import os
from contextlib import contextmanager

import torch
from torch import nn

from ember.forward_batch import ForwardBatch
from ember.layers.linear import Linear

PAGE = 64


@contextmanager
def _reference_ops():
    old = os.environ.get("EMBER_NO_TRITON")
    os.environ["EMBER_NO_TRITON"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["EMBER_NO_TRITON"]
        else:
            os.environ["EMBER_NO_TRITON"] = old


def _decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear) and n.startswith("model.layers.")}


def output_fisher(model: nn.Module, tokens: torch.Tensor, device, seed: int = 0,
                  chunk_tokens: int = 512) -> dict[str, torch.Tensor]:
    """{linear name: f (N,) float32 on CPU}, f_n = mean over the tokens (rows, L) of (d log p(y)/d y_n)^2.
    chunk_tokens bounds the tokens of one forward/backward: the autograd graph holds every layer's
    activations and the (T, vocab) logits, so memory grows with it (2048 tokens took ~10 GB for SmolLM2)."""
    rows, L = tokens.shape
    cfg = model.config
    linears = _decoder_linears(model)
    sums = {n: torch.zeros(m.out_features, dtype=torch.float64, device=device) for n, m in linears.items()}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_m, _args, out):
            out.retain_grad()
            outputs[name] = out
        return hook

    def leaf(_m, _args, out):  # the embeddings start the graph: everything after them is differentiable
        return out.detach().requires_grad_(True)

    handles = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
    handles.append(model.model.embed_tokens.register_forward_hook(leaf))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    per = max(1, chunk_tokens // L)
    pages = math.ceil(L / PAGE)
    try:
        with _reference_ops(), torch.enable_grad():
            for r0 in range(0, rows, per):
                chunk = tokens[r0:r0 + per]
                n = chunk.shape[0]
                shape = (n * pages, cfg.num_kv_heads, PAGE, cfg.head_dim)
                dtype = model.model.embed_tokens.weight.dtype
                kv = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                      for _ in range(cfg.num_layers)]
                seqs = [(chunk[r].tolist(), 0, list(range(r * pages, (r + 1) * pages))) for r in range(n)]
                batch = ForwardBatch.build(seqs, PAGE, device, need_all_logits=True)
                logp = model(batch, kv).float().log_softmax(-1)  # (T, V)
                y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(device)  # (T, 1)
                logp.gather(1, y).sum().backward()
                for name, out in outputs.items():
                    sums[name] += out.grad.double().pow(2).sum(0)
                outputs.clear()
                del logp, kv
    finally:
        for h in handles:
            h.remove()
    return {n: (s / (rows * L)).float().cpu() for n, s in sums.items()}
