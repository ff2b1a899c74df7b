"""Self-attention over the paged KV cache: fused QKV projection, rotary, cache write, paged attention."""
from __future__ import annotations

import torch
from torch import nn

from ember.config import ModelConfig
from ember.forward_batch import ForwardBatch
from ember.kernels import ops
from ember.layers.linear import Linear
from ember.layers.rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim ** -0.5
        self.sliding_window = config.sliding_window
        shards = (("q_proj", self.q_size), ("k_proj", self.kv_size), ("v_proj", self.kv_size))
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.attention_bias, shards)
        self.o_proj = Linear(self.q_size, config.hidden_size, config.attention_bias)
        self.rotary = rotary  # shared by all layers; not a parameter

    def forward(self, x: torch.Tensor, batch: ForwardBatch, kv: tuple[torch.Tensor, torch.Tensor],
                epi_in=None, epi_out=None) -> torch.Tensor:
        """x (T, H) -> (T, H). epi_in / epi_out (quantized layers only, kernels/epilogue.py): folded into
        the QKV and the output projections' stores."""
        t = x.shape[0]
        qkv = self.qkv_proj(x) if epi_in is None else self.qkv_proj(x, epi_in)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)  # (T, Hq, D)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # (T, Hk, D)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv  # (P, Hk, page, D) each
        o = self._attend(q, k, v, batch, k_cache, v_cache)  # (T, Hq, D)
        o = o.reshape(t, self.q_size)
        return self.o_proj(o) if epi_out is None else self.o_proj(o, epi_out)

    def _attend(self, q, k, v, batch: ForwardBatch, k_cache, v_cache) -> torch.Tensor:
        """Unrotated q (T, Hq, D), k, v (T, Hk, D) -> attention output (T, Hq, D); writes the new k/v."""
        if batch.max_query_len == 1 and ops.use_triton(q) and ops.fuse_enabled():
            # decode: rotary, the new k/v written into their pages and attention, all in one launch
            return ops.decode_attention_rope(q, k, v, batch.positions, self.rotary.cos_sin, k_cache, v_cache,
                                             batch.slot_mapping, batch.block_tables, batch.seq_lens,
                                             batch.query_start_loc, self.scale, self.sliding_window)
        # rotary on q and k, and k/v written into their pages, in one launch on the GPU
        q, k = ops.rope_store_kv(q, k, v, batch.positions, self.rotary.cos_sin, k_cache, v_cache,
                                 batch.slot_mapping)
        # Kernels read lengths from device tensors (CUDA-graph safe); the CPU reference loops over host lists.
        # k/v and the host lists let a prefill without cached prefix run on contiguous k/v (SDPA).
        host = not q.is_cuda and batch.seq_lens_cpu is not None
        return ops.paged_attention(q, k_cache, v_cache, batch.block_tables,
                                   batch.seq_lens_cpu if host else batch.seq_lens,
                                   batch.query_start_loc_cpu if host else batch.query_start_loc,
                                   self.scale, self.sliding_window, max_query_len=batch.max_query_len, k=k, v=v,
                                   seq_lens_cpu=batch.seq_lens_cpu, query_start_loc_cpu=batch.query_start_loc_cpu)
