"""What rounding the activations to e4m3 per 128 inputs (the --fp8-prefill path, kernels/qmatmul_fp8.py) costs
a real model: SmolLM2-135M-Instruct (bundled), held-out text, KL(p_16 || p_fp8), top-1 agreement and
perplexity, on CPU in fp32.

Every linear of the decoder layers gets its input rounded as reference.fp8_quantize_act rounds it (a last
block shorter than 128, as SmolLM2's 576 inputs leave, gets its own scale); weights stay as loaded, since the
path keeps quantized weights exact. The GPU path itself needs 128-aligned inputs, which SmolLM2 does not
have except in down_proj, so this emulation is how a real model's activations (outliers included) are
measured here.

  PYTHONPATH=. python3 scripts/fp8_quality.py [--ctx 2048] [--windows 4] [--json]
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

from ember.bench.eval import kl_top1, make_windows, nll_sum, window_logits
from ember.config import EngineConfig
from ember.layers.linear import Linear
from ember.layers.quant_linear import QuantLinear
from ember.llm import LLM
from ember.quant.data import heldout_text_file


def round_e4m3_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> the same values after per-128-input e4m3 rounding (dequantized back to x's dtype)."""
    K = x.shape[-1]
    xf = x.float().reshape(-1, K)
    pad = -K % 128
    xp = F.pad(xf, (0, pad)).view(xf.shape[0], -1, 128)
    s = xp.abs().amax(-1, keepdim=True).clamp_min(1e-20) / 448.0
    q = (xp / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * s
    return q.view(xf.shape[0], -1)[:, :K].view(x.shape).to(x.dtype)


def _rounded(fwd, calls: list):
    def forward(x, *args, **kw):
        calls.append(1)
        return fwd(round_e4m3_blocks(x), *args, **kw)
    return forward


def patch(model: nn.Module, calls: list) -> int:
    """Round the input of every decoder-layer linear; each call appends to `calls`."""
    n = 0
    for name, m in model.named_modules():
        if "layers." in name and isinstance(m, (Linear, QuantLinear)):
            m.forward = _rounded(m.forward, calls)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    llm = LLM(None, EngineConfig(device="cpu", dtype="float32", max_seq_len=a.ctx))
    text = heldout_text_file().read_text(encoding="utf-8")
    wins = make_windows(llm.tokenizer.encode(text), a.ctx, a.windows)
    refs = [window_logits(llm, w) for w in wins]
    calls: list = []
    n = patch(llm.model, calls)
    nll = [0.0, 0.0]
    kl = top = tokens = 0.0
    for w, ref in zip(wins, refs):
        got = window_logits(llm, w)
        tgt = torch.tensor(w[1:])
        nll[0] += nll_sum(ref[:-1], tgt)
        nll[1] += nll_sum(got[:-1], tgt)
        assert len(calls) >= n, "the rounding was not applied"
        k, t = kl_top1(ref[:-1], got[:-1])
        kl, top, tokens = kl + k, top + t, tokens + len(w) - 1
    res = {"model": "SmolLM2-135M-Instruct (16-bit weights)", "linears_rounded": n, "windows": len(wins),
           "ctx": a.ctx, "tokens": int(tokens), "ppl_16": math.exp(nll[0] / tokens), "ppl_fp8": math.exp(nll[1] / tokens),
           "kld": kl / tokens, "top1": top / tokens}
    print(f"{n} linears, {len(wins)} windows x {a.ctx}: ppl {res['ppl_16']:.3f} -> {res['ppl_fp8']:.3f}, "
          f"KL {res['kld']:.5f} nats, top-1 {res['top1']:.4f}")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
