"""Swap quantized layers into a model being loaded: ember-format folders and GPTQ checkpoints.

Used as build_model's quant_hook: called on the meta-device model before dense weights are planned, it
replaces each quantized Linear with a QuantLinear holding real tensors on the target device, and returns the
source names it consumed. GPTQ's separate q/k/v (gate/up) matrices are fused into one QuantizedTensor when
they share their input permutation; with act-order they usually do not, and then a ConcatLinear runs them
side by side."""
from __future__ import annotations

import torch
from torch import nn

from ember.errors import WeightsError
from ember.layers.linear import Linear
from ember.layers.quant_linear import QuantLinear
from ember.quant.format import FORMAT_VERSION, PIECES, QuantizedTensor, read_manifest, upgrade
from ember.quant.gptq_checkpoint import load_gptq_linear


class ConcatLinear(nn.Module):
    """Several linears on the same input whose outputs are concatenated (unfusable GPTQ shards)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class _Lazy:
    """dict-like view of a source: tensors are read only when asked for."""

    def __init__(self, source, used: set[str]):
        self.source, self.names, self.used = source, set(source.names()), used

    def __contains__(self, k):
        return k in self.names

    def __getitem__(self, k):
        self.used.add(k)
        return self.source.get(k)

    def get(self, k, default=None):
        return self[k] if k in self.names else default


def fuse(qts: list[QuantizedTensor]) -> QuantizedTensor | None:
    """Concatenate along N when the input side (perm, rotation, segments) is identical; else None."""
    a = qts[0]
    for b in qts[1:]:
        same_perm = (a.perm is None and b.perm is None) or (
            a.perm is not None and b.perm is not None and torch.equal(a.perm, b.perm))
        if not same_perm or a.had != b.had or not torch.equal(a.segments, b.segments):
            return None
        if (a.qzeros is None) != (b.qzeros is None) or (a.bias is None) != (b.bias is None):
            return None
    cat = lambda xs: None if xs[0] is None else torch.cat(xs, dim=-1)
    return QuantizedTensor(
        qweight=cat([q.qweight for q in qts]), scales=cat([q.scales for q in qts]),
        qzeros=cat([q.qzeros for q in qts]), perm=a.perm, had=a.had, segments=a.segments,
        bias=cat([q.bias for q in qts]), in_features=a.in_features,
        out_features=sum(q.out_features for q in qts))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _check(qt: QuantizedTensor, lin: Linear, name: str) -> None:
    if (qt.in_features, qt.out_features) != (lin.in_features, lin.out_features):
        raise WeightsError(f"{name}: quantized weight is {qt.out_features}x{qt.in_features}, the config implies "
                           f"{lin.out_features}x{lin.in_features}")


def ember_hook(model: nn.Module, source, device) -> set[str]:
    used: set[str] = set()
    lazy = _Lazy(source, used)
    folder = getattr(source, "folder", None)  # the manifest says which format version the files hold
    version = read_manifest(folder)["version"] if folder is not None else FORMAT_VERSION
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Linear) and f"{name}.qweight" in lazy:
            pieces = {f"{name}.{p}": lazy[f"{name}.{p}"] for p in PIECES if f"{name}.{p}" in lazy}
            qt = QuantizedTensor.from_state_dict(name, pieces)
            _check(qt, mod, name)
            _replace(model, name, QuantLinear(upgrade(qt.to(device), version)))  # (repacked on the device)
    return used


def gptq_hook(bits: int, group_size: int):
    if bits not in (4, 8):
        raise WeightsError(f"GPTQ checkpoints with {bits} bits are not supported (4 and 8 are)")

    def hook(model: nn.Module, source, device) -> set[str]:
        used: set[str] = set()
        lazy = _Lazy(source, used)
        for name, mod in list(model.named_modules()):
            if not isinstance(mod, Linear):
                continue
            parent = name.rpartition(".")[0]
            prefixes = [f"{parent}.{s}" for s, _ in mod.shards] if mod.shards else [name]
            if f"{prefixes[0]}.qweight" not in lazy:
                continue
            qts = [load_gptq_linear(lazy, p, bits, group_size) for p in prefixes]
            for p in prefixes:
                used.update(k for k in (f"{p}.g_idx", f"{p}.bias") if k in lazy)
            fused = fuse(qts)
            new = QuantLinear(fused.to(device)) if fused is not None else ConcatLinear(
                [QuantLinear(q.to(device)) for q in qts])
            if new.in_features != mod.in_features or new.out_features != mod.out_features:
                raise WeightsError(f"{name}: GPTQ weight is {new.out_features}x{new.in_features}, the config "
                                   f"implies {mod.out_features}x{mod.in_features}")
            _replace(model, name, new)
        return used

    return hook


def quant_hook_for(fmt: str, quantization: dict | None):
    if fmt == "ember":
        return ember_hook
    if fmt == "gptq":
        q = quantization or {}
        return gptq_hook(int(q.get("bits", 4)), int(q.get("group_size", 128)))
    return None
