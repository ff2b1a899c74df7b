"""The Llama family: Llama 2/3/3.1, Mistral, CodeLlama, SmolLM2. Variants differ only by config
(GQA/MQA head counts, rope theta and scaling, sliding window, tied embeddings, biases)."""
from __future__ import annotations

import torch
from torch import nn

from ember.config import ModelConfig
from ember.forward_batch import ForwardBatch
from ember.layers.attention import Attention
from ember.layers.embedding import Embedding
from ember.layers.linear import Linear
from ember.layers.mlp import MLP
from ember.layers.norm import RMSNorm
from ember.layers.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, batch: ForwardBatch, kv):
        # The residual stream is carried separately so each norm fuses the preceding add.
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch, kv)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.rotary = RotaryEmbedding(config, max_positions)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, self.rotary) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, batch: ForwardBatch, kv_caches) -> torch.Tensor:
        x, residual = self.embed_tokens(batch.input_ids), None  # (T, H)
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, batch, kv)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def forward(self, batch: ForwardBatch, kv_caches) -> torch.Tensor:
        """Returns float32 logits (N, V) for batch.logits_indices (all T tokens when it is None)."""
        h = self.model(batch, kv_caches)
        if batch.logits_indices is not None:
            h = h[batch.logits_indices]
        return self.lm_head(h).float()
