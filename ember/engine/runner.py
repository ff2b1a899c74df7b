"""Decode steps over static buffers, captured as CUDA graphs (one per batch size and mode).

A decode step for b sequences reads only device buffers: the last token of each sequence, its position,
its block table. Inside the graph it derives the KV slot from the block table, runs the model, picks the
next token (greedy mode) and advances the buffers itself, so between steps the host only reads the sampled
tokens. In "logits" mode the graph stops at the logits; the caller samples and calls `advance(tokens)`.

On CPU (or with graphs disabled) the same step runs eagerly, which is how it is tested without a GPU.

`launch` / `collect` split a greedy step in two for streaming: `launch` queues the step and a copy of its
tokens into pinned host memory and returns at once, so the caller can queue the next step (its input is already
on the device) before it waits for this one's tokens. The GPU then never idles while the host reads a token,
yields it and launches the next graph. At most two steps are in flight; `drain` waits for them.

NOTE: capture runs a few warm-up steps that write into the KV cache; they write only into the scratch page
(the last page of the cache, which the block manager never hands out), so capturing never corrupts a
running sequence."""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator

import torch

from ember.engine.sampler import argmax
from ember.forward_batch import ForwardBatch
from ember.kernels import ops
from ember.kernels.reference import decode_slots

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def step_kernels() -> bool:
    """Whether CUDA steps do their bookkeeping in two Triton launches (kernels/step.py) instead of ~20 torch
    ops (EMBER_STEP_KERNELS=0: the torch ops)."""
    return os.environ.get("EMBER_STEP_KERNELS", "1") != "0"


def async_decode() -> bool:
    """Greedy streaming queues each step before the previous one's tokens are read (`greedy_tokens`), unless
    EMBER_ASYNC_DECODE=0: 8B decode 432.0 / 432.9 tok/s against 423.3 / 428.8 (call H1, docs/benchmarks.md)."""
    return os.environ.get("EMBER_ASYNC_DECODE", "1") != "0"


class DecodeRunner:
    def __init__(self, model, kv, max_batch: int, max_pages: int, device: torch.device, use_graphs: bool | None = None):
        self.model, self.kv, self.device = model, kv, device
        self.kv_layers = kv.layers()
        self.page_size = kv.page_size
        self.scratch_page = kv.num_pages - 1
        self.max_batch, self.max_pages = max_batch, max_pages
        z = lambda *s, dt=torch.int64: torch.zeros(*s, dtype=dt, device=device)
        self.ids, self.pos, self.tokens = z(max_batch), z(max_batch), z(max_batch)  # (Bmax,)
        self.tables = torch.full((max_batch, max_pages), self.scratch_page, dtype=torch.int32, device=device)
        self.seq_lens = z(max_batch, dt=torch.int32)
        self.slots = z(max_batch)
        self.qsl = torch.arange(max_batch + 1, dtype=torch.int32, device=device)  # one new token per sequence
        self.logits = torch.zeros(max_batch, model.config.vocab_size, dtype=torch.float32, device=device)
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.pool = None
        cuda = device.type == "cuda"
        # launch / collect: two host slots for the tokens of the steps in flight, and their events
        self._host = [torch.zeros(max_batch, dtype=torch.int64, pin_memory=cuda) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)] if cuda else None
        self._pending: deque[tuple[int, int]] = deque()  # (slot, rows) of the launched steps, oldest first
        self._slot = 0

    # -- host-side updates (between steps) ------------------------------------------------------------
    def set_sequence(self, row: int, last_token: int, position: int, pages: list[int]) -> None:
        """Row `row` continues a sequence whose next input is `last_token` at `position`."""
        if len(pages) > self.max_pages:
            raise ValueError(f"sequence needs {len(pages)} pages, the runner holds {self.max_pages}")
        self.ids[row] = last_token
        self.pos[row] = position
        t = torch.full((self.max_pages,), self.scratch_page, dtype=torch.int32)
        t[: len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.tables[row].copy_(t)

    def advance(self, tokens: torch.Tensor) -> None:
        """After a logits-mode step: the sampled tokens (b,) become the next inputs."""
        b = tokens.shape[0]
        self.ids[:b].copy_(tokens)
        self.pos[:b] += 1

    # -- the step -------------------------------------------------------------------------------------
    def _step(self, b: int, greedy: bool) -> None:
        pos = self.pos[:b]  # (b,)
        fast = self.device.type == "cuda" and ops.use_triton(pos) and step_kernels()  # (EMBER_NO_TRITON=1: torch)
        if fast:  # (imported here: Triton is optional on CPU, and its mode is fixed at import)
            from ember.kernels.step import greedy_advance, prepare_decode

            prepare_decode(pos, self.tables[:b], self.page_size, self.slots[:b], self.seq_lens[:b])
        else:
            slot, seq_lens = decode_slots(pos, self.tables[:b], self.page_size)
            self.slots[:b].copy_(slot)
            self.seq_lens[:b].copy_(seq_lens)
        batch = ForwardBatch(
            input_ids=self.ids[:b], positions=pos, slot_mapping=self.slots[:b], block_tables=self.tables[:b],
            seq_lens=self.seq_lens[:b], query_start_loc=self.qsl[: b + 1], max_query_len=1,
            max_seq_len=self.max_pages * self.page_size)
        if greedy and fast:  # the head's own dtype: greedy_advance reads it as it is
            greedy_advance(self.model(batch, self.kv_layers, float_logits=False), self.tokens[:b], self.ids[:b],
                           self.pos[:b])
            return
        logits = self.model(batch, self.kv_layers)  # (b, V) float32
        if greedy:
            tok = argmax(logits)
            self.tokens[:b].copy_(tok)
            self.ids[:b].copy_(tok)
            self.pos[:b] += 1
        else:
            self.logits[:b].copy_(logits)

    def _graph_size(self, b: int) -> int:
        for s in GRAPH_BATCH_SIZES:
            if s >= b and s <= self.max_batch:
                return s
        return b

    def _capture(self, b: int, greedy: bool):
        saved = [t.clone() for t in (self.ids, self.pos, self.tables, self.seq_lens)]
        self.tables[:b] = self.scratch_page  # warm-up and capture write only into the scratch page
        self.pos[:b] = 0
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(2):  # compiles the Triton kernels, builds launch plans, settles allocations
                self.pos[:b] = 0
                self._step(b, greedy)
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.pos[:b] = 0
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool), torch.inference_mode():
            self._step(b, greedy)
        self.pool = g.pool()
        for t, old in zip((self.ids, self.pos, self.tables, self.seq_lens), saved):
            t.copy_(old)
        return g

    def step(self, b: int, greedy: bool = True) -> torch.Tensor:
        """One decode step of rows [0, b). Returns tokens (b,) in greedy mode, else logits (b, V) (device)."""
        if not self.use_graphs:
            with torch.inference_mode():
                self._step(b, greedy)
        else:
            size = self._graph_size(b)
            if size > b:  # padding rows decode into the scratch page and are ignored
                self.tables[b:size] = self.scratch_page
                self.pos[b:size] = 0
            key = (size, greedy)
            if key not in self.graphs:
                self.graphs[key] = self._capture(size, greedy)
            self.graphs[key].replay()
        return self.tokens[:b] if greedy else self.logits[:b]

    # -- pipelined greedy steps (streaming) ------------------------------------------------------------
    def launch(self, b: int) -> None:
        """Queue one greedy step of rows [0, b) and the copy of its tokens to host memory; returns without
        waiting. Its input tokens are the previous step's, already in `ids` on the device."""
        if len(self._pending) == len(self._host):
            raise RuntimeError("two steps are already in flight: collect one first")
        self.step(b, greedy=True)
        slot, self._slot = self._slot, self._slot ^ 1
        self._host[slot][:b].copy_(self.tokens[:b], non_blocking=True)  # ordered after the step, same stream
        if self._events is not None:
            self._events[slot].record()
        self._pending.append((slot, b))

    def collect(self) -> list[int]:
        """The tokens of the oldest launched step, once it has finished."""
        slot, b = self._pending.popleft()
        if self._events is not None:
            self._events[slot].synchronize()
        return self._host[slot][:b].tolist()

    def greedy_tokens(self, b: int, n: int, pipelined: bool) -> Iterator[list[int]]:
        """The tokens of n greedy steps of rows [0, b), each list read back by the host as it is yielded.
        pipelined: each step is queued before the previous one's tokens are read (launch / collect); a caller
        that stops early leaves a step in flight and must `drain` before reusing its pages."""
        if not pipelined:
            for _ in range(n):
                yield self.step(b, greedy=True).tolist()
            return
        if n > 0:
            self.launch(b)
        for i in range(n):
            if i + 1 < n:
                self.launch(b)
            yield self.collect()

    def drain(self) -> None:
        """Wait for every launched step (before the pages it writes are handed to anyone else)."""
        while self._pending:
            self.collect()
