"""SwiGLU MLP: down(silu(gate(x)) * up(x)), with gate and up as one fused projection."""
from __future__ import annotations

import torch
from torch import nn

from ember.config import ModelConfig
from ember.kernels import ops
from ember.layers.linear import Linear


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(h, 2 * i, config.mlp_bias, shards=(("gate_proj", i), ("up_proj", i)))
        self.down_proj = Linear(i, h, config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))  # (T, 2I) -> (T, I) -> (T, H)
