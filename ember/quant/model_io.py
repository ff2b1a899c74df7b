"""The converter's view of its input: linear shapes, the checks a model must pass to be quantizable, and
the float model on the device (quantized sources are dequantized back to float first)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ember.config import ModelConfig
from ember.errors import ConfigError, WeightsError
from ember.layers.linear import Linear
from ember.models.loader import build_model
from ember.quant.format import BLOCK, dequantize
from ember.quant.load import quant_hook_for
from ember.quant.runner import LINEARS


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(N, K) of every linear the converter quantizes, by ember name (fused), the head last."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    per = {"self_attn.qkv_proj": (cfg.q_size + 2 * cfg.kv_size, h), "self_attn.o_proj": (h, cfg.q_size),
           "mlp.gate_up_proj": (2 * i, h), "mlp.down_proj": (h, i)}
    out = {f"model.layers.{j}.{n}": per[n] for j in range(cfg.num_layers) for n in LINEARS}
    out["lm_head"] = (cfg.vocab_size, h)
    return out


def check_shapes(shapes: dict[str, tuple[int, int]]) -> None:
    """The format packs inputs in blocks of 64: every linear's input count must be a multiple of 64."""
    for name, (n, k) in shapes.items():
        if k % BLOCK:
            raise ConfigError(f"{name} has shape [{n}, {k}] (out, in): its {k} inputs are not a multiple of "
                              f"{BLOCK}, which the ember format needs; this model cannot be converted")


def source_identity(path: str | Path) -> list:
    """What identifies the input for the job folder's keys: names, sizes and mtimes of its files."""
    p = Path(path).resolve()
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    return [str(p)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _find_nonfinite(source) -> list[str]:
    bad = []
    for name in source.names():
        t = source.get(name)
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            bad.append(name)
    return bad


def _densify(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace quantized layers (a GPTQ / ember source) by float Linears holding the dequantized weight."""
    from ember.layers.quant_linear import QuantLinear
    from ember.quant.load import ConcatLinear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, (QuantLinear, ConcatLinear)):
            parts = mod.parts if isinstance(mod, ConcatLinear) else [mod]
            W = torch.cat([dequantize(p.qt, torch.float32) for p in parts], 0)
            biases = [p.bias for p in parts]
            lin = Linear(mod.in_features, mod.out_features, bias=biases[0] is not None)
            lin.weight = nn.Parameter(W.to(dtype), requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(torch.cat(biases).to(dtype), requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, lin)


def load_float_model(src, device: torch.device, dtype: torch.dtype, max_positions: int,
                     progress: bool = True) -> nn.Module:
    """The source as a float model on `device`. NaN/Inf weights: WeightsError naming every such tensor."""
    try:
        model = build_model(src.config, src.tensors, device, dtype, max_positions, where=str(src.path),
                            progress=progress, quant_hook=quant_hook_for(src.format, src.config.quantization))
    except WeightsError as e:
        if "NaN or Inf" not in str(e):
            raise
        bad = _find_nonfinite(src.tensors)
        raise WeightsError(f"{src.path}: tensor(s) {', '.join(bad)} hold NaN or Inf values; the model cannot "
                           f"be quantized (re-export or re-download it)") from None
    _densify(model, dtype)
    return model
