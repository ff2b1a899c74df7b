"""Single-sequence prefill replayed as CUDA graphs, one per padded prompt length.

An eager prefill of a 7-8B model launches ~500 kernels and torch ops; at a few hundred tokens the host cannot
issue them as fast as the GPU runs them (H100, Llama-3-8B shape, 512 tokens: 33 ms eager against 18 ms for
the same forward replayed as one graph, scripts/profile_decode.py). So prompts of up to MAX_GRAPH_TOKENS run
through a graph captured for their length rounded up to a multiple of BUCKET.

Padding: the prompt's n tokens are followed by Tb - n pad tokens in the same sequence. Attention is causal,
so no real token sees a pad; pads get KV slot -1 (the cache write skips them) and the logits are taken at
token n - 1 (a device buffer). Every input lives in static device buffers that the host fills before a replay;
the logits land in a static (1, V) buffer outside the graph pool: read it before the next prefill.

Only for a sequence with nothing cached yet and no sliding window shorter than the padded length (the
graph's attention is the SDPA path over the new tokens); anything else runs eagerly, as on CPU."""
from __future__ import annotations

import numpy as np
import torch

from ember.forward_batch import ForwardBatch

BUCKET = 256  # padded lengths are multiples of this: at most BUCKET - 1 wasted tokens per prompt
MAX_GRAPH_TOKENS = 2048  # longer prompts are GPU-bound anyway; each bucket's graph keeps its own activations


class PrefillRunner:
    def __init__(self, model, kv, max_pages: int, device: torch.device, use_graphs: bool | None = None,
                 max_tokens: int = MAX_GRAPH_TOKENS, pad_eagerly: bool = False):
        """use_graphs: None = on CUDA. pad_eagerly (tests, CPU): run the padded static-buffer forward without
        a graph, which checks the padding on any device."""
        self.model, self.device = model, device
        self.kv_layers = kv.layers()
        self.page_size = kv.page_size
        self.max_pages = max_pages
        cfg = model.config
        rope_len = model.model.rotary.cos_sin.shape[0] if hasattr(model.model, "rotary") else max_tokens
        self.max_tokens = min(max_tokens, max_pages * kv.page_size, rope_len)
        self.window = cfg.sliding_window
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.pad_eagerly = pad_eagerly
        t = self.max_tokens
        # (4, Tmax) int64: input ids, positions, KV slots, and [0, 0] the logits row; with the block table,
        # filled from pinned staging copies by two asynchronous host-to-device copies per prefill (no kernel)
        self.inputs = torch.zeros(4, t, dtype=torch.int64, device=device)
        self.table = torch.zeros(1, max_pages, dtype=torch.int32, device=device)
        self.logits_index = self.inputs[3, :1]
        pin = device.type == "cuda"
        self._host = torch.zeros(4, t, dtype=torch.int64, pin_memory=pin)
        self._host[1] = torch.arange(t)  # positions never change
        self._host_table = torch.zeros(max_pages, dtype=torch.int32, pin_memory=pin)
        # numpy views of the same memory: filling them costs ~1 us an op where torch's CPU ops cost several,
        # and this host work is all that runs before the graph starts (it is on every prompt's latency)
        self._np, self._np_table = self._host.numpy(), self._host_table.numpy()
        self._copied = torch.cuda.Event() if pin else None  # set: the staging buffers may be refilled
        self.logits = torch.zeros(1, cfg.vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._keep: list[tuple[torch.Tensor, torch.Tensor]] = []  # per-graph length buffers
        self.pool = None

    def bucket(self, n: int) -> int:
        return -(-n // BUCKET) * BUCKET

    def applies(self, n: int) -> bool:
        tb = self.bucket(n)
        return ((self.use_graphs or self.pad_eagerly) and 0 < n and tb <= self.max_tokens
                and (self.window is None or self.window >= tb))

    def forward(self, tokens: list[int], pages: list[int]) -> torch.Tensor:
        """Logits (1, V) float32 of the last prompt token; writes the prompt's KV into `pages`."""
        n = len(tokens)
        if not self.applies(n):
            batch = ForwardBatch.build([(tokens, 0, pages)], self.page_size, self.device)
            with torch.inference_mode():
                return self.model(batch, self.kv_layers)
        tb = self.bucket(n)
        if self._copied is not None:
            self._copied.synchronize()  # the previous prefill's copies have read the staging buffers
        host, table = self._np, self._np_table
        host[0, :n] = tokens
        host[0, n:tb] = 0
        page_ids = np.asarray(pages, dtype=np.int64)
        pos = host[1, :n]
        host[2, :tb] = -1  # pads: no KV write
        host[2, :n] = page_ids[pos // self.page_size] * self.page_size + pos % self.page_size
        host[3, 0] = n - 1
        table[: len(pages)] = page_ids
        table[len(pages):] = 0
        self.inputs.copy_(self._host, non_blocking=True)
        self.table[0].copy_(self._host_table, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if not self.use_graphs:
            with torch.inference_mode():
                self._run(self._batch(tb, keep=False))
        else:
            if tb not in self.graphs:
                self.graphs[tb] = self._capture(tb)
            self.graphs[tb].replay()
        return self.logits

    def _run(self, batch: ForwardBatch) -> None:
        self.logits.copy_(self.model(batch, self.kv_layers))

    def _batch(self, tb: int, keep: bool = True) -> ForwardBatch:
        # Lengths are fixed per padded length: their device copies are made here, outside any capture (a
        # host-to-device copy cannot be captured), and kept alive with the graph.
        lens = torch.tensor([tb], dtype=torch.int32, device=self.device)
        qsl = torch.tensor([0, tb], dtype=torch.int32, device=self.device)
        if keep:
            self._keep.append((lens, qsl))
        return ForwardBatch(
            input_ids=self.inputs[0, :tb], positions=self.inputs[1, :tb], slot_mapping=self.inputs[2, :tb],
            block_tables=self.table, seq_lens=lens, query_start_loc=qsl, max_query_len=tb, max_seq_len=tb,
            seq_lens_cpu=[tb], query_start_loc_cpu=[0, tb], logits_indices=self.logits_index)

    def _capture(self, tb: int) -> torch.cuda.CUDAGraph:
        batch = self._batch(tb)
        # The warm-up (kernel compilation, launch plans, allocator settling) and the capture compute the
        # current prompt itself, so the KV they write is exactly what the replay writes again.
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s), torch.inference_mode():
            self._run(batch)
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool), torch.inference_mode():
            self._run(batch)
        self.pool = g.pool()
        return g
