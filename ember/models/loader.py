"""Build a model from a weight source, strictly and layer by layer.

The model is built on the meta device (no memory), given empty storage on the target device, then every
parameter is filled from the source one tensor at a time: host memory stays near one tensor. The mapping
from ember's parameters to source names is derived from the modules themselves (fused linears know their
HF shards), so a missing, unexpected or mis-shaped tensor is reported by name before anything is copied."""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ember.config import ModelConfig
from ember.errors import WeightsError
from ember.kernels.reference import rope_cos_sin
from ember.layers.linear import Linear
from ember.models.registry import model_class

# Source tensors that carry no weights ember needs.
IGNORED = ("*.rotary_emb.inv_freq", "rope_freqs.weight")


@dataclass
class Slot:
    """One ember parameter and the source tensors (concatenated along dim 0) it is made of."""

    module: nn.Module
    attr: str
    sources: list[str]
    shapes: list[tuple[int, ...]]


def weight_plan(model: nn.Module, config: ModelConfig) -> list[Slot]:
    plan = []
    for mod_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if p is None:
                continue
            full = f"{mod_name}.{attr}"
            if full == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if isinstance(module, Linear) and module.shards:
                parent = mod_name.rsplit(".", 1)[0]
                tail = tuple(p.shape[1:])
                plan.append(Slot(module, attr, [f"{parent}.{s}.{attr}" for s, _ in module.shards],
                                 [(rows, *tail) for _, rows in module.shards]))
            else:
                plan.append(Slot(module, attr, [full], [tuple(p.shape)]))
    return plan


def check_names(plan: list[Slot], source, config: ModelConfig, where: str) -> None:
    expected = {n: s for slot in plan for n, s in zip(slot.sources, slot.shapes)}
    present = [n for n in source.names() if not any(fnmatch.fnmatch(n, pat) for pat in IGNORED)]
    if config.tie_word_embeddings:
        present = [n for n in present if n != "lm_head.weight"]
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"{where}: missing tensor(s) {', '.join(missing[:5])}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise WeightsError(f"{where}: unexpected tensor(s) {', '.join(unexpected[:5])}{more} "
                           f"for a {config.architecture} with this config")
    for name, shape in expected.items():
        got = tuple(source.shape(name))
        if got != shape:
            raise WeightsError(f"{where}: tensor {name} has shape {list(got)}, the config implies {list(shape)}")


def build_model(config: ModelConfig, source, device, dtype: torch.dtype, max_positions: int,
                where: str = "model", progress: bool = True, quant_hook=None) -> nn.Module:
    """quant_hook(model, source, device) may replace Linear modules with quantized ones before the dense
    parameters are planned (GPTQ / ember-quantized sources); it returns the names of source tensors it used."""
    cls = model_class(config.architecture)
    with torch.device("meta"):
        model = cls(config, max_positions).to(dtype=dtype)  # before the hook: quantized buffers keep their dtypes
    used = set(quant_hook(model, source, device) if quant_hook else ())
    plan = weight_plan(model, config)
    check_names(plan, _Without(source, used), config, where)
    _materialize(model, device)
    bar = tqdm(plan, desc="loading", unit="tensor", file=sys.stderr, disable=not progress, leave=False)
    with torch.no_grad():
        for slot in bar:
            parts = [source.get(n) for n in slot.sources]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            if not torch.isfinite(t.float() if t.dtype != torch.float32 else t).all():
                raise WeightsError(f"{where}: tensor {slot.sources[0]} holds NaN or Inf values")
            getattr(slot.module, slot.attr).copy_(t)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary.cos_sin = rope_cos_sin(config.head_dim, max_positions, config.rope_theta,
                                              config.rope_scaling).to(device)
    return model.eval()


def _materialize(model: nn.Module, device) -> None:
    """Give meta parameters empty storage on `device`, except those already real (quantized layers)."""
    for module in model.modules():
        for attr, p in list(module.named_parameters(recurse=False)):
            if p is not None and p.is_meta:
                setattr(module, attr, nn.Parameter(torch.empty_like(p, device=device), requires_grad=False))
        for attr, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                module._buffers[attr] = torch.empty_like(b, device=device)


class _Without:
    """A view of a source without the names a quant hook consumed."""

    def __init__(self, source, used: set[str]):
        self.source, self.used = source, used

    def names(self):
        return [n for n in self.source.names() if n not in self.used]

    def shape(self, name):
        return self.source.shape(name)
