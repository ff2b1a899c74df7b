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
        gate_up = self.gate_up_proj(x)  # (T, 2I)
        fused = getattr(self.down_proj, "forward_silu", None)  # quantized layers fuse SiLU-mul into their load
        if fused is not None:
            return fused(gate_up)  # (T, H)
        return self.down_proj(ops.silu_and_mul(gate_up))  # (T, 2I) -> (T, I) -> (T, H)
