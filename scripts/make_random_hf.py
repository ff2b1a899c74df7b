"""Write a random float16 HF Llama folder of real shapes (default: Llama-3-8B) for timing `ember convert`.

    python scripts/make_random_hf.py OUT [--layers 32] [--device cuda] [--tokenizer-from HF_FOLDER]

Weights are N(0, 0.02) (norms 1 + small noise), one safetensors shard per layer so host memory stays near
one layer; the tokenizer is the bundled SmolLM2's (its ids are all below the vocabulary size), so the
bundled calibration text works. Only for speed measurements: the model computes nothing meaningful."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5}


def layer_tensors(i: int, cfg: dict, gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}
    out = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02
        out[f"model.layers.{i}.{name}.weight"] = w.half().cpu()
    for name in ("input_layernorm", "post_attention_layernorm"):
        n = 1 + 0.05 * torch.randn(h, generator=gen, device=device)
        out[f"model.layers.{i}.{name}.weight"] = n.half().cpu()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", help="copy tokenizer.json + tokenizer_config.json from this HF folder "
                    "instead of writing the bundled GGUF's tokenizer (the device carries no GGUF)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **LLAMA3_8B,
           "num_hidden_layers": args.layers, "tie_word_embeddings": False, "torch_dtype": "float16",
           "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    n_files = args.layers + 2
    weight_map: dict[str, str] = {}

    def write(j: int, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{j + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    rand = lambda *shape: (torch.randn(*shape, generator=gen, device=args.device) * 0.02).half().cpu()
    write(0, {"model.embed_tokens.weight": rand(v, h)})
    for i in range(args.layers):  # one layer in host memory at a time
        write(i + 1, layer_tensors(i, cfg, gen, args.device))
    write(n_files - 1, {"model.norm.weight": torch.ones(h, dtype=torch.float16), "lm_head.weight": rand(v, h)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if args.tokenizer_from:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(args.tokenizer_from) / f, out / f)
    else:
        from ember.io.bundled import bundled_model_path
        from ember.io.source import open_source

        open_source(bundled_model_path()).tokenizer().save(out)
    print(f"wrote {out}: {args.layers} layers of Llama-3-8B shape")


if __name__ == "__main__":
    main()
