"""Memory estimates made before loading, so a model that cannot fit is refused with numbers, not an OOM
halfway through. Counts weights (as they will sit on the device), the KV cache and a working margin."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.config import ModelConfig
from ember.engine.kv_cache import kv_bytes_per_token
from ember.errors import OutOfMemoryError

GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    workspace: int
    kv_per_1k_tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace


def estimate(config: ModelConfig, weight_bytes: int, max_seq_len: int, dtype: torch.dtype,
             page_size: int = 64, max_batch_tokens: int = 2048, quantized: bool = False) -> MemoryEstimate:
    per_tok = kv_bytes_per_token(config, dtype)
    pages = (max_seq_len + page_size - 1) // page_size
    esize = torch.empty(0, dtype=dtype).element_size()
    t = min(max_batch_tokens, max_seq_len)
    # Activations of one prefill chunk of t tokens (fused QKV, gate/up, logits in fp32) plus a fixed margin.
    act = t * esize * (config.q_size + 2 * config.kv_size + 2 * config.intermediate_size + 4 * config.hidden_size)
    act += config.vocab_size * 4 * 2 + 256 * 2**20
    if quantized:  # a long prefill dequantizes one matrix at a time for cuBLAS: the largest, in 16 bits
        h, i = config.hidden_size, config.intermediate_size
        act += esize * max(h * (config.q_size + 2 * config.kv_size), h * 2 * i, h * config.vocab_size)
    return MemoryEstimate(weight_bytes, pages * page_size * per_tok, act, per_tok * 1024)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def check_fits(est: MemoryEstimate, device: torch.device, max_seq_len: int, limit_gib: float | None = None) -> None:
    free = int(limit_gib * GiB) if limit_gib is not None else free_bytes(device)
    if est.total <= free:
        return
    over = est.total - free
    hints = []
    if est.kv_cache > 0:
        fit = max_seq_len - -(-over // max(est.kv_per_1k_tokens, 1)) * 1024
        if fit >= 256:
            hints.append(f"lower --max-seq-len to {fit} or less (each 1024 tokens of context cost "
                         f"{est.kv_per_1k_tokens / GiB:.2f} GiB)")
        else:
            hints.append("lower --max-seq-len")
    hints.append("use a model quantized to fewer bits (ember convert --bpw ...)")
    hints.append("or use another device (--device)")
    raise OutOfMemoryError(
        f"the model needs {est.total / GiB:.2f} GiB on {device} (weights {est.weights / GiB:.2f} GiB + KV cache "
        f"{est.kv_cache / GiB:.2f} GiB for {max_seq_len} tokens + workspace {est.workspace / GiB:.2f} GiB) but only "
        f"{free / GiB:.2f} GiB is free: " + "; ".join(hints)
    )
