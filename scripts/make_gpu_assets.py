"""Files the GPU machine cannot get itself (the bundled 98 MB GGUF does not fit what a device call carries):
a small HF folder with SmolLM2's tokenizer (saved from the bundled GGUF) and random weights, so the GPU run can
exercise `ember generate` end to end. Written to .gpu_assets/ (git-ignored; carried by the device call).

  .venv/bin/python scripts/make_gpu_assets.py
"""
from pathlib import Path

import torch

from ember.io.bundled import bundled_model_path
from ember.io.gguf import GGUFFile
from ember.tokenizer import Tokenizer

out = Path(".gpu_assets/tiny-smol")
out.mkdir(parents=True, exist_ok=True)
Tokenizer.from_gguf_metadata(GGUFFile(bundled_model_path()).metadata).save(out)
import transformers

cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                               bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
torch.manual_seed(0)
transformers.LlamaForCausalLM(cfg).half().save_pretrained(out, safe_serialization=True)
print("wrote", out, sorted(p.name for p in out.iterdir()))
