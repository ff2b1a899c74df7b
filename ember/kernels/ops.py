"""The ops the layers call. Each runs its Triton kernel on CUDA tensors and its PyTorch reference elsewhere.

- EMBER_NO_TRITON=1 forces the references everywhere (checked at every call).
- EMBER_TRITON_CPU=1 also sends CPU tensors to the Triton kernels, which then need Triton's interpreter
  (TRITON_INTERPRET=1, set before triton is imported); that is how the tests exercise the kernels without
  a GPU. NOTE: Triton decides interpreter-or-GPU when a kernel module
  is imported, so the variable must be set before the first Triton op runs (the kernel modules are imported
  lazily, on first use, for that reason).

Fused variant: rope_store_kv = rope + store_kv in one launch (saves a launch and a re-read of k per layer).
decode_attention_rope = rope + store_kv + split-K decode attention in one launch (decode batches only).
paged_attention takes keywords beyond the reference's (all optional): max_query_len (ForwardBatch's) picks the
split-K decode kernel (1) or the prefill kernel; k, v (the new tokens' keys/values) with seq_lens_cpu /
query_start_loc_cpu send prompts without a cached prefix to torch SDPA. Pass seq_lens / query_start_loc as
device int32 tensors on CUDA (host lists work but are copied, which CUDA-graph capture forbids)."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ember.kernels import reference


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on x runs its Triton kernel."""
    if os.environ.get("EMBER_NO_TRITON") == "1" or not _have_triton():
        return False
    return x.is_cuda or os.environ.get("EMBER_TRITON_CPU") == "1"


def fuse_enabled() -> bool:
    """Decode batches fold the norms, residual adds, SiLU, rope and KV write into the matmul and attention
    kernels (models/llama.py); EMBER_FUSE=0 turns that off (A/B benchmarks, debugging)."""
    return os.environ.get("EMBER_FUSE", "1") != "0"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        from ember.kernels import norm
        return norm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    if use_triton(x):
        from ember.kernels import norm
        return norm.add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from ember.kernels import activation
        return activation.silu_and_mul(x)
    return reference.silu_and_mul(x)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    if use_triton(q):
        from ember.kernels import rope as rope_kernels
        return rope_kernels.rope(q, k, positions, cos_sin)
    return reference.rope(q, k, positions, cos_sin)


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if use_triton(k):
        from ember.kernels import attention
        return attention.store_kv(k, v, k_cache, v_cache, slot_mapping)
    return reference.store_kv(k, v, k_cache, v_cache, slot_mapping)


def rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping):
    """rope(q, k) + store_kv(rotated k, v, ...) in one launch; returns the rotated (q, k)."""
    if use_triton(q):
        from ember.kernels import rope as rope_kernels
        return rope_kernels.rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    return reference.rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale: float,
                    sliding_window: int | None = None, *, max_query_len: int | None = None,
                    k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                    seq_lens_cpu=None, query_start_loc_cpu=None) -> torch.Tensor:
    """The reference's contract; the keywords (all optional) are for the Triton path, see
    ember.kernels.attention.paged_attention: max_query_len picks decode vs prefill, and k, v with the host
    lists let prompts without a cached prefix run through torch SDPA."""
    if use_triton(q):
        from ember.kernels import attention
        return attention.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                         sliding_window, max_query_len=max_query_len, k=k, v=v,
                                         seq_lens_cpu=seq_lens_cpu, query_start_loc_cpu=query_start_loc_cpu)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                     sliding_window)


def decode_attention_rope(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, block_tables, seq_lens,
                          query_start_loc, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Decode batches only (at most one new token per sequence): rope(q, k), the new k/v written to their
    slots (a negative slot writes nothing), then paged attention; one kernel launch on the Triton path.
    q (T, Hq, D), k, v (T, Hk, D): the unrotated projections (not modified). Returns (T, Hq, D)."""
    if use_triton(q):
        from ember.kernels import attention
        return attention.decode_attention_rope(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping,
                                               block_tables, seq_lens, query_start_loc, scale, sliding_window)
    q, _ = reference.rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    return reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                     sliding_window)
