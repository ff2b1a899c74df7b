"""The Llama family: Llama 2/3/3.1, Mistral, CodeLlama, SmolLM2. Variants differ only by config
(GQA/MQA head counts, rope theta and scaling, sliding window, tied embeddings, biases)."""
from __future__ import annotations

import torch
from torch import nn

from ember.config import ModelConfig
from ember.forward_batch import ForwardBatch
from ember.kernels import ops
from ember.kernels.epilogue import Epilogue
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

    def forward_fused(self, x, h, batch: ForwardBatch, kv, ss: torch.Tensor, i: int, next_norm: RMSNorm):
        """The same layer with its norms, residual adds and SiLU folded into the quantized projections'
        stores (kernels/epilogue.py). h (T, H): the residual stream, updated in place. x (T, H): the input
        norm's output for layer 0, else h * input_layernorm.weight with mean(h^2) in ss[2i]. ss (2L+1, T)
        fp32, zero on entry. Returns h * next_norm.weight; its mean squares go to ss[2i+2]."""
        eps = self.input_layernorm.eps
        mid = self.post_attention_layernorm
        x = self.self_attn(x, batch, kv, epi_in=Epilogue(rms_in=ss[2 * i], eps=eps) if i > 0 else None,
                           epi_out=Epilogue(residual=h, gamma=mid.weight, rms_out=ss[2 * i + 1]))
        return self.mlp(x, epi_in=Epilogue(rms_in=ss[2 * i + 1], eps=mid.eps, glu=True),
                        epi_out=Epilogue(residual=h, gamma=next_norm.weight, rms_out=ss[2 * i + 2]))


FUSED_MAX_ROWS = 32  # the quantized matmul's kernel paths up to here (qmatmul.SMALL_ROWS): decode batches


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self._fusable: bool | None = None
        self.rotary = RotaryEmbedding(config, max_positions)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, self.rotary) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def fusable(self) -> bool:
        """Whether every projection is quantized without bias (the fused epilogues need the quantized
        matmul); EMBER_FUSE=0 turns the fused decode path off (ops.fuse_enabled)."""
        if self._fusable is None:
            from ember.layers.quant_linear import QuantLinear

            projs = [m for layer in self.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                          layer.mlp.gate_up_proj, layer.mlp.down_proj)]
            self._fusable = all(isinstance(m, QuantLinear) and m.bias is None for m in projs)
        return self._fusable and ops.fuse_enabled()

    def use_fused(self, x: torch.Tensor) -> bool:
        """Decode-sized batches on the Triton path of a fully quantized model (CPU: no gain)."""
        return x.shape[0] <= FUSED_MAX_ROWS and ops.use_triton(x) and self.fusable()

    def forward(self, batch: ForwardBatch, kv_caches) -> torch.Tensor:
        """Final hidden states (N, H): of batch.logits_indices' rows when given, else of all T tokens."""
        x, residual = self.embed_tokens(batch.input_ids), None  # (T, H)
        if self.use_fused(x):
            return self._forward_fused(x, batch, kv_caches)
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, batch, kv)
        if batch.logits_indices is not None:  # a prompt needs its last rows only: norm just those
            x, residual = x[batch.logits_indices], residual[batch.logits_indices]
        x, _ = self.norm(x, residual)
        return x

    def _forward_fused(self, h: torch.Tensor, batch: ForwardBatch, kv_caches) -> torch.Tensor:
        """Decode-sized batches on the kernels: 4 matmuls + attention per layer, no norm or SiLU launches."""
        n = len(self.layers)
        ss = torch.zeros((2 * n + 1, h.shape[0]), dtype=torch.float32, device=h.device)  # mean(h^2) per norm
        x = self.layers[0].input_layernorm(h)
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            nxt = self.layers[i + 1].input_layernorm if i + 1 < n else self.norm
            x = layer.forward_fused(x, h, batch, kv, ss, i, nxt)
        return self.norm(h if batch.logits_indices is None else h[batch.logits_indices])


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)

    def forward(self, batch: ForwardBatch, kv_caches, float_logits: bool = True) -> torch.Tensor:
        """Returns logits (N, V) for batch.logits_indices (all T tokens when it is None): float32, or the
        head's own dtype when float_logits is False (greedy decode needs no copy)."""
        h = self.model(batch, kv_caches)  # (N, H): the logits rows only
        logits = self.lm_head(h)
        return logits.float() if float_logits else logits
