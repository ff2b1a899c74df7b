"""The two small kernels around a decode step (engine/runner.py): one before the model, one after it.

A CUDA graph replays launches back to back, yet each dependent launch still costs ~1.5-3 us. The step used
torch ops for its bookkeeping: 19 launches, 43 us of a 2.12 ms Llama-3-8B step (call J1's graph timeline,
docs/benchmarks.md). Here it is two:

- `prepare_decode`: each row's cache slot (its page from the block table) and seq_len from its position.
  Launched without PDL on purpose: the step's PDL kernels may read this metadata before their PDL wait
  (attention_decode.early), which is safe only while a plain launch writes it.
- `greedy_advance`: the first index of each row's maximum logit (torch.argmax's choice), read straight from
  the head's fp16/bf16/fp32 output; then tokens, next input ids and positions. Split over chunks of the
  vocabulary; the last chunk program of a row (an atomic counter, zero between launches) combines them.

References: reference.decode_slots and torch.argmax (the runner's torch path, EMBER_STEP_KERNELS=0)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ember.kernels import pdl

ARGMAX_CHUNK = 2048  # vocabulary entries per program, at most: 64 programs (a power of two) for 128256


@triton.jit
def _prepare_kernel(pos_ptr, tables_ptr, slot_ptr, seq_lens_ptr, B, s_t, PAGE: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    live = r < B
    pos = tl.load(pos_ptr + r, mask=live, other=0)  # (BLOCK,) int64
    page = tl.load(tables_ptr + r.to(tl.int64) * s_t + pos // PAGE, mask=live, other=0).to(tl.int64)
    tl.store(slot_ptr + r, page * PAGE + pos % PAGE, mask=live)
    tl.store(seq_lens_ptr + r, (pos + 1).to(tl.int32), mask=live)


def prepare_decode(pos: torch.Tensor, tables: torch.Tensor, page: int, slot: torch.Tensor,
                   seq_lens: torch.Tensor) -> None:
    """pos (B,) int64, tables (B, pages) int32 -> slot (B,) int64 = tables[b, pos // page] * page + pos % page
    and seq_lens (B,) int32 = pos + 1, written in place."""
    b = pos.shape[0]
    _prepare_kernel[(1,)](pos, tables, slot, seq_lens, b, tables.stride(0), PAGE=page,
                          BLOCK=max(16, triton.next_power_of_2(b)), num_warps=1)


@triton.jit
def _greedy_kernel(logits_ptr, s_l, V, tok_ptr, ids_ptr, pos_ptr, part_v_ptr, part_i_ptr, cnt_ptr,
                   CHUNK: tl.constexpr, C: tl.constexpr, PDL: tl.constexpr):
    pdl.launch_dependents(PDL)
    pdl.wait(PDL)
    r = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(logits_ptr + r.to(tl.int64) * s_l + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # noqa: PLR0124 (NaN counts as the largest: torch.argmax picks a NaN)
    m = tl.max(x, 0)
    first = tl.min(tl.where(x == m, offs, V), 0)  # the first index holding the chunk's maximum
    tl.store(part_v_ptr + r * C + c, m)
    tl.store(part_i_ptr + r * C + c, first)
    tl.debug_barrier()  # the partials are written before the counter is released
    if tl.atomic_add(cnt_ptr + r, 1, sem="acq_rel") == C - 1:  # the last chunk of row r combines them
        cc = tl.arange(0, C)  # C: a power of two
        vals = tl.load(part_v_ptr + r * C + cc, cache_modifier=".cg")
        idx = tl.load(part_i_ptr + r * C + cc, cache_modifier=".cg")
        best = tl.min(tl.where(vals == tl.max(vals, 0), idx, V), 0).to(tl.int64)
        tl.store(tok_ptr + r, best)
        tl.store(ids_ptr + r, best)
        tl.store(pos_ptr + r, tl.load(pos_ptr + r) + 1)
        tl.atomic_xchg(cnt_ptr + r, 0, sem="relaxed")


@functools.cache
def _scratch(device: torch.device, rows: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial maxima, their indices and per-row counters (zero between launches), per device and shape:
    allocated on the first (eager) step, before any graph capture, and kept for the graphs that use them."""
    return (torch.empty(rows * chunks, dtype=torch.float32, device=device),
            torch.empty(rows * chunks, dtype=torch.int32, device=device),
            torch.zeros(rows, dtype=torch.int32, device=device))


def greedy_advance(logits: torch.Tensor, tokens: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> None:
    """logits (B, V) (any float dtype, last stride 1) -> tokens[b] = ids[b] = argmax(logits[b]) (int64, the
    first index of the maximum), pos[b] += 1; all in place, nothing read back."""
    b, v = logits.shape
    assert logits.stride(1) == 1 and tokens.dtype == ids.dtype == pos.dtype == torch.int64
    chunks = triton.next_power_of_2(triton.cdiv(v, ARGMAX_CHUNK))
    chunk = triton.next_power_of_2(triton.cdiv(v, chunks))
    part_v, part_i, cnt = _scratch(logits.device, b, chunks)
    _greedy_kernel[(b, chunks)](logits, logits.stride(0), v, tokens, ids, pos, part_v, part_i, cnt, CHUNK=chunk,
                                C=chunks, num_warps=4, **pdl.launch_kwargs(logits.device))
