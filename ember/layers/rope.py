"""Rotary position embedding with a precomputed [cos | sin] table (float32, one row per position)."""
from __future__ import annotations

import torch
from torch import nn

from ember.config import ModelConfig
from ember.kernels import ops
from ember.kernels.reference import rope_cos_sin


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        table = rope_cos_sin(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.register_buffer("cos_sin", table, persistent=False)  # (max_positions, head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        # q: (T, Hq, D), k: (T, Hk, D), positions: (T,)
        return ops.rope(q, k, positions, self.cos_sin)
