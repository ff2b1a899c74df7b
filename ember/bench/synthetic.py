"""Models of real shapes with random quantized weights, built directly on the device (speed does not depend
on the values). Random int32 words are valid packed codes for every width, so nothing is packed."""
from __future__ import annotations

import torch
from torch import nn

from ember.config import ModelConfig
from ember.kernels.reference import rope_cos_sin
from ember.layers.linear import Linear
from ember.layers.quant_linear import QuantLinear
from ember.models.registry import model_class
from ember.quant.candidates import rotation_block
from ember.quant.format import QuantizedTensor, make_segments

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=32768,
                       sliding_window=4096),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
    "codellama-34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=32000, rope_theta=1000000.0,
                          max_position_embeddings=16384),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
}


def synthetic_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown synthetic model {name!r}; choose from {', '.join(SHAPES)}")
    return ModelConfig.from_hf(dict(SHAPES[name], architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5))


def segment_spec(k: int, bpw: float, group: int = 128) -> list[tuple[int, int, int]]:
    """Segments for a synthetic matrix of about `bpw` stored bits per weight (codes + one fp16 scale per
    group). Within 0.25 of a supported width the matrix is uniform at that width (4.0 -> 4 bits, 4.125 bpw
    stored, like a 4-bit GPTQ g128 model); otherwise two adjacent widths are mixed (the wider first, as the
    converter orders them) to hit the target. Segment lengths are multiples of the group size."""
    code_bits = bpw - 16 / group
    widths = [2, 3, 4, 5, 6, 8]
    near = min(widths, key=lambda w: abs(w - bpw))
    if abs(near - bpw) <= 0.25:
        return [(k, near, group)]
    lo = max((w for w in widths if w <= code_bits), default=2)
    hi = min((w for w in widths if w >= code_bits), default=8)
    if lo == hi:
        return [(k, lo, group)]
    n_groups = k // group
    n_hi = round(n_groups * (code_bits - lo) / (hi - lo))
    spec = [(n_hi * group, hi, group), ((n_groups - n_hi) * group, lo, group)]
    return [s for s in spec if s[0] > 0]


def random_quantized(k: int, n: int, spec, device, gen: torch.Generator, act_order: bool = False) -> QuantizedTensor:
    """Random codes and scales in the layout of spec; act_order: as the converter writes a matrix (an input
    permutation, zero points inside each width's code range, the converter's Hadamard rotation)."""
    seg = make_segments(spec)
    rows = sum(k_len * bits // 32 for k_len, bits, _ in spec)
    groups = sum(k_len // g for k_len, _, g in spec)
    qweight = torch.randint(-2**31, 2**31 - 1, (rows, n), dtype=torch.int32, device=device, generator=gen)
    scales = (torch.rand(groups, n, device=device, generator=gen) * 2e-3 + 1e-3).half()
    zeros = perm = None
    had = 0
    if act_order:
        zeros = torch.cat([torch.randint(0, 1 << bits, (k_len // g, n), device=device, generator=gen)
                           for k_len, bits, g in spec]).to(torch.uint8)
        perm = torch.randperm(k, device=device, generator=gen).int()
        had = rotation_block(k)
    return QuantizedTensor(qweight=qweight, scales=scales, qzeros=zeros, perm=perm, had=had, segments=seg.to(device),
                           bias=None, in_features=k, out_features=n)


def build_synthetic(name: str, bpw: float, head_bits: int, device, dtype=torch.float16, max_positions: int = 4096,
                    group: int = 128, seed: int = 0, act_order: bool = False) -> nn.Module:
    return build_random(synthetic_config(name), bpw, head_bits, device, dtype, max_positions, group, seed, act_order)


def build_random(cfg: ModelConfig, bpw: float, head_bits: int, device, dtype=torch.float16, max_positions: int = 4096,
                 group: int = 128, seed: int = 0, act_order: bool = False) -> nn.Module:
    """A model of config cfg with random quantized linears (the head quantized unless head_bits >= 16), in the
    converter's act-order layout with act_order (random_quantized)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = model_class(cfg.architecture)(cfg, max_positions).to(dtype)
    for mod_name, mod in list(model.named_modules()):
        if not isinstance(mod, Linear):
            continue
        if mod_name == "lm_head" and head_bits >= 16:
            continue
        bits = head_bits if mod_name == "lm_head" else bpw
        qt = random_quantized(mod.in_features, mod.out_features, segment_spec(mod.in_features, bits, group), device, gen,
                              act_order)
        parent, _, attr = mod_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, QuantLinear(qt))
    for module in model.modules():
        for attr, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                t = torch.randn(p.shape, device=device, generator=gen, dtype=torch.float32) * 0.02
                if attr == "weight" and p.dim() == 1:
                    t = torch.ones(p.shape, device=device)  # norms
                setattr(module, attr, nn.Parameter(t.to(dtype), requires_grad=False))
    model.model.rotary.cos_sin = rope_cos_sin(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling).to(device)
    return model.eval()


def decoder_bpw(model: nn.Module) -> float:
    """Stored bits per weight over the decoder's quantized linears (the head excluded), as EXL2 counts."""
    bits = weights = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and name != "lm_head":
            bits += mod.qt.stored_bits()
            weights += mod.in_features * mod.out_features
    return bits / weights if weights else float("nan")


def stored_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights read per decoded token: every quantized/dense linear, norms; not the embedding table
    (one row per token)."""
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            total += mod.qt.stored_bits() // 8
        elif isinstance(mod, Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    return total
