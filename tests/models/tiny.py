"""Tiny random-weight HF checkpoints of each Llama-family variant, written with transformers."""
from __future__ import annotations

import torch

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, torch_dtype="float32",
            bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "llama2": dict(BASE, architectures=["LlamaForCausalLM"], num_key_value_heads=4, rope_theta=10000.0),
    "llama3.1": dict(BASE, architectures=["LlamaForCausalLM"], rope_theta=500000.0,
                     rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=32)),
    "mistral": dict(BASE, architectures=["MistralForCausalLM"], sliding_window=16, rope_theta=10000.0),
    "codellama": dict(BASE, architectures=["LlamaForCausalLM"], rope_theta=1000000.0, num_key_value_heads=4),
    "mqa-tied": dict(BASE, architectures=["LlamaForCausalLM"], num_key_value_heads=1, tie_word_embeddings=True),
}


def write_tiny(name: str, folder, seed: int = 0):
    """Save a random model of variant `name` to `folder`; returns the transformers model (fp32, eval)."""
    import transformers

    cfg_d = dict(VARIANTS[name])
    arch = cfg_d["architectures"][0]
    model_type = "mistral" if arch.startswith("Mistral") else "llama"
    cfg = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in cfg_d.items() if k != "torch_dtype"})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and small weights; perturb so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def quantized_tiny(hf_config: dict, device, dtype, max_positions: int, group: int, scale_gain: float,
                   act_order: bool = False):
    """A model with random quantized projections (4.125 bpw, 8-bit head) whose norm weights differ per channel,
    so a misplaced one shows, and whose scales are multiplied by `scale_gain`, so that every layer moves the
    logits (the synthetic scales alone give weights of ~1e-2). act_order: the converter's layout (input
    permutations, zero points, rotations)."""
    from ember.bench.synthetic import build_random
    from ember.config import ModelConfig
    from ember.layers.quant_linear import QuantLinear

    torch.manual_seed(0)
    cfg = ModelConfig.from_hf(dict(hf_config, architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5))
    model = build_random(cfg, 4.0, 8, device, dtype, max_positions, group=group, act_order=act_order)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                mod.scales.mul_(scale_gain)
    return model
