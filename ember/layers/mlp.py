"""SwiGLU MLP: down(silu(gate(x)) * up(x)), with gate and up as one fused projection."""
from __future__ import annotations

import torch
from torch import nn

from ember.config import ModelConfig
from ember.kernels import ops
from ember.kernels.epilogue import Epilogue
from ember.layers.linear import Linear


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = Linear(h, 2 * i, config.mlp_bias, shards=(("gate_proj", i), ("up_proj", i)))
        self.down_proj = Linear(i, h, config.mlp_bias)

    def forward(self, x: torch.Tensor, epi_in=None, epi_out=None) -> torch.Tensor:
        """x (T, H) -> (T, H). epi_in / epi_out (quantized layers only, kernels/epilogue.py): folded into
        gate_up (with glu: it returns silu(gate) * up) and into down."""
        if epi_in is not None:
            act = self.gate_up_proj(x, epi_in)  # (T, I)
        elif getattr(self.gate_up_proj, "fuses_glu", None) and self.gate_up_proj.fuses_glu(x):
            act = self.gate_up_proj(x, Epilogue(glu=True))  # prompts: SiLU-and-multiply in the matmul's store
        else:
            gate_up = self.gate_up_proj(x)  # (T, 2I)
            down, rows = self.down_proj, gate_up.shape[0]
            if epi_out is None and getattr(down, "takes_rounded_input", None) and \
                    down.takes_rounded_input(rows, gate_up.dtype):
                # FP8 prefill: SiLU-and-multiply writes the down projection's e4m3 input directly
                from ember.kernels.qmatmul_fp8 import quantize_act

                return down.forward_rounded(*quantize_act(gate_up, down.perm, silu=True), rows, gate_up.dtype)
            act = ops.silu_and_mul(gate_up)  # (T, 2I) -> (T, I)
        return self.down_proj(act) if epi_out is None else self.down_proj(act, epi_out)  # (T, H)
