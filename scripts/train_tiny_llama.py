"""Train a small Llama for a fixed wall-clock time and save it as an HF folder, so the quantizers can be
scored on weights that came out of training rather than off a quantization grid (SmolLM2's GGUF is Q4_1).

    PYTHONPATH=. python3 scripts/train_tiny_llama.py OUT [--seconds 90] [--tokenizer GGUF_OR_FOLDER]

Model: 6 layers, hidden 512, 8 query / 4 KV heads, MLP 1536, SmolLM2's tokenizer (vocab 49152), tied
embeddings. Text: ember's calibration texts plus this Python's standard library sources; every 10th stdlib
file is held out and written to OUT/heldout.txt for evaluation. Needs transformers (and a GPU to be useful).
OUT gets config.json, model.safetensors (float16), tokenizer.json / tokenizer_config.json, heldout.txt and
train_log.json."""
from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

from ember.io.source import open_source
from ember.quant.data import default_calibration_files

SHAPE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
         "num_key_value_heads": 4, "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": True}
MAX_STDLIB_BYTES = 12_000_000
MAX_HELDOUT_BYTES = 400_000


def corpus() -> tuple[list[str], str]:
    """(training texts, held-out text): calibration files + stdlib .py files, every 10th stdlib file out."""
    texts = [f.read_text(encoding="utf-8") for f in default_calibration_files()]
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    held, size = [], 0
    for i, f in enumerate(files):
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if i % 10 == 5:
            if sum(map(len, held)) < MAX_HELDOUT_BYTES:
                held.append(t)
        elif size < MAX_STDLIB_BYTES:
            texts.append(t)
            size += len(t)
    return texts, "\n\n".join(held)


def token_blocks(tok, texts: list[str], seq: int) -> torch.Tensor:
    """All texts tokenized (EOS between documents) and cut into (n, seq) blocks."""
    eos = tok.eos_id if tok.eos_id is not None else 0
    ids: list[int] = []
    for enc in tok.backend.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids + [eos]
    n = len(ids) // seq
    return torch.tensor(ids[:n * seq]).view(n, seq)


def train(out: Path, tokenizer_src: str | None, seconds: float, seq: int, batch: int, lr: float,
          device: str = "cuda") -> dict:
    import transformers

    tok = open_source(tokenizer_src).tokenizer() if tokenizer_src else None
    if tok is None:
        from ember.io.bundled import bundled_model_path

        tok = open_source(bundled_model_path()).tokenizer()
    texts, heldout = corpus()
    data = token_blocks(tok, texts, seq)
    cfg = transformers.LlamaConfig(vocab_size=49152, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, **SHAPE)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")
    gen = torch.Generator().manual_seed(0)
    t0, step, losses, warmup = time.perf_counter(), 0, [], 100
    while (elapsed := time.perf_counter() - t0) < seconds:
        frac = elapsed / seconds  # the schedule follows wall-clock time: cosine to 10% after warm-up
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        x = data[torch.randint(0, data.shape[0], (batch,), generator=gen)].to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 100 == 0:
            losses.append((step, round(time.perf_counter() - t0, 1), round(loss.item(), 4)))
            print(f"step {step} t {losses[-1][1]} s loss {losses[-1][2]}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    tok.save(out)
    (out / "heldout.txt").write_text(heldout, encoding="utf-8")
    log = {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "tokens_per_step": batch * seq,
           "train_tokens": int(data.numel()), "heldout_chars": len(heldout), "losses": losses,
           "params": sum(p.numel() for p in model.parameters()), "device": torch.cuda.get_device_name() if device == "cuda" else device}
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", default=None, help="model whose tokenizer to use (default: bundled SmolLM2)")
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    a = ap.parse_args()
    log = train(a.out, a.tokenizer, a.seconds, a.seq, a.batch, a.lr, a.device)
    print(json.dumps({k: v for k, v in log.items() if k != "losses"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
