"""Run one decoder layer over the calibration rows, chunk by chunk, and collect its linears' input Hessians.

The hidden states of all rows, h (rows, L, H), are the only activations kept between layers. A layer runs
through ember's own modules (norms, attention over a small paged KV cache, MLP), so calibration sees
exactly what inference computes. Hessians are H = sum_t x_t^T x_t in float32 over all calibration tokens,
one per input of the fused linears: qkv_proj, o_proj, gate_up_proj, down_proj."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ember.config import ModelConfig
from ember.forward_batch import ForwardBatch
from ember.kernels import ops

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
PAGE = 64


def _accumulate(H: torch.Tensor, x: torch.Tensor) -> None:
    x = x.reshape(-1, x.shape[-1]).float()  # (T, K)
    H.addmm_(x.T, x)


@contextmanager
def _capture_input(module: nn.Module):
    """Collects the input of every call of `module` into the yielded list."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


class LayerRunner:
    """Chunks of rows through one layer. chunk_tokens bounds the tokens of one forward (and the KV cache)."""

    def __init__(self, config: ModelConfig, rows: int, row_len: int, device, dtype: torch.dtype,
                 chunk_tokens: int = 8192):
        self.config, self.rows, self.row_len, self.device, self.dtype = config, rows, row_len, device, dtype
        self.chunk = max(1, min(rows, chunk_tokens // row_len))
        self.pages_per_row = math.ceil(row_len / PAGE)
        n_pages = self.chunk * self.pages_per_row
        shape = (n_pages, config.num_kv_heads, PAGE, config.head_dim)
        self.kv = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        self._batches: dict[int, ForwardBatch] = {}

    def _batch(self, n_rows: int) -> ForwardBatch:
        if n_rows not in self._batches:
            seqs = [([0] * self.row_len, 0, list(range(r * self.pages_per_row, (r + 1) * self.pages_per_row)))
                    for r in range(n_rows)]
            self._batches[n_rows] = ForwardBatch.build(seqs, PAGE, self.device, need_all_logits=True)
        return self._batches[n_rows]

    def chunks(self):
        for r0 in range(0, self.rows, self.chunk):
            yield slice(r0, min(r0 + self.chunk, self.rows))

    def new_hessian(self, k: int) -> torch.Tensor:
        return torch.zeros(k, k, dtype=torch.float32, device=self.device)

    # ---- pieces of a layer on one chunk: x (n, L, H) -> flat (n*L, H) ------------------------------------
    def attention_input(self, layer, h: torch.Tensor) -> torch.Tensor:
        return layer.input_layernorm(h.reshape(-1, h.shape[-1]))

    def attention(self, layer, a: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(o_proj input (T, q), attention output (T, H)) for normed input a (T, H)."""
        with _capture_input(layer.self_attn.o_proj) as seen:
            out = layer.self_attn(a, self._batch(n_rows), self.kv)
        return seen[0], out

    def mlp_act(self, layer, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up input (T, H), down input (T, I)) from the residual stream r (T, H)."""
        b = layer.post_attention_layernorm(r)
        return b, ops.silu_and_mul(layer.mlp.gate_up_proj(b))

    # ---- whole passes ------------------------------------------------------------------------------------
    @torch.no_grad()
    def float_pass(self, layer, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward of every chunk with the layer as it is: returns the four Hessians and updates h
        (rows, L, H) in place to the layer's output."""
        cfg = self.config
        Hs = {"self_attn.qkv_proj": self.new_hessian(cfg.hidden_size),
              "self_attn.o_proj": self.new_hessian(cfg.q_size),
              "mlp.gate_up_proj": self.new_hessian(cfg.hidden_size),
              "mlp.down_proj": self.new_hessian(cfg.intermediate_size)}
        for sl in self.chunks():
            x = h[sl].reshape(-1, h.shape[-1])
            a = self.attention_input(layer, x)
            _accumulate(Hs["self_attn.qkv_proj"], a)
            o_in, attn = self.attention(layer, a, sl.stop - sl.start)
            _accumulate(Hs["self_attn.o_proj"], o_in)
            r = x + attn
            b, act = self.mlp_act(layer, r)
            _accumulate(Hs["mlp.gate_up_proj"], b)
            _accumulate(Hs["mlp.down_proj"], act)
            h[sl] = (r + layer.mlp.down_proj(act)).reshape(h[sl].shape)
        return Hs

    @torch.no_grad()
    def sequential_pass(self, layer, h: torch.Tensor, quantize) -> None:
        """The quantize stage's pass: each linear's Hessian comes from inputs computed with the linears
        before it already quantized. quantize(name, H) replaces the layer's weight and returns nothing.
        h (rows, L, H) is updated in place to the (quantized) layer's output."""
        cfg = self.config
        H = self.new_hessian(cfg.hidden_size)
        for sl in self.chunks():
            _accumulate(H, self.attention_input(layer, h[sl]))
        quantize("self_attn.qkv_proj", H)
        o_ins, H = [], self.new_hessian(cfg.q_size)  # o_proj inputs of all rows: (rows*L, q) in total
        for sl in self.chunks():
            o_in, _ = self.attention(layer, self.attention_input(layer, h[sl]), sl.stop - sl.start)
            _accumulate(H, o_in)
            o_ins.append(o_in)
        quantize("self_attn.o_proj", H)
        for sl, o_in in zip(self.chunks(), o_ins):  # h becomes the residual stream after attention
            h[sl] += layer.self_attn.o_proj(o_in).reshape(h[sl].shape)
        del o_ins
        H = self.new_hessian(cfg.hidden_size)
        for sl in self.chunks():
            _accumulate(H, layer.post_attention_layernorm(h[sl].reshape(-1, h.shape[-1])))
        quantize("mlp.gate_up_proj", H)
        H = self.new_hessian(cfg.intermediate_size)
        for sl in self.chunks():
            _accumulate(H, self.mlp_act(layer, h[sl].reshape(-1, h.shape[-1]))[1])
        quantize("mlp.down_proj", H)
        for sl in self.chunks():
            act = self.mlp_act(layer, h[sl].reshape(-1, h.shape[-1]))[1]
            h[sl] += layer.mlp.down_proj(act).reshape(h[sl].shape)

    @torch.no_grad()
    def head_hessian(self, norm, h: torch.Tensor) -> torch.Tensor:
        """Hessian of the LM head's input: the final norm of h (rows, L, H)."""
        H = self.new_hessian(self.config.hidden_size)
        for sl in self.chunks():
            _accumulate(H, norm(h[sl].reshape(-1, h.shape[-1])))
        return H
