"""ForwardBatch: the one typed hand-off from whoever schedules tokens (the simple generator, later the
batching engine) to `model.forward`. Attention reads its paging information here, never from a global."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """A flat batch of T new tokens from B sequences (ragged, no padding).

    NOTE: a sequence's new tokens are contiguous in the flat order, sequences in block-table order.
    """

    input_ids: torch.Tensor  # (T,) int64: the new tokens
    positions: torch.Tensor  # (T,) int64: their positions in their sequences
    slot_mapping: torch.Tensor  # (T,) int64: KV-cache slot of each new token = page * page_size + offset
    block_tables: torch.Tensor  # (B, max_pages) int32: page ids of each sequence, in order; unused = 0
    seq_lens: torch.Tensor  # (B,) int32: tokens in the cache after this step (old + new)
    query_start_loc: torch.Tensor  # (B + 1,) int32: cumulative count of new tokens per sequence
    max_query_len: int  # longest run of new tokens of one sequence (1 for pure decode)
    max_seq_len: int  # longest seq_len
    # Host copies (lists of ints) of seq_lens / query_start_loc for reference paths that loop over
    # sequences; the CUDA-graph path never touches them.
    seq_lens_cpu: list[int] | None = None
    query_start_loc_cpu: list[int] | None = None
    # Only the last token of each sequence needs logits while generating; None means all of them.
    logits_indices: torch.Tensor | None = None  # (B,) int64 indices into the T tokens

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1

    @staticmethod
    def build(
        seqs: list[tuple[list[int], int, list[int]]], page_size: int, device, need_all_logits: bool = False
    ) -> ForwardBatch:
        """Build from host lists: one (new_tokens, num_cached, page_ids) tuple per sequence, where
        num_cached tokens of the sequence are already in the cache and page_ids covers all of them plus
        the new ones."""
        ids, pos, slots, qsl, lens = [], [], [], [0], []
        max_pages = max(len(p) for _, _, p in seqs)
        tables = []
        for new, cached, pages in seqs:
            n = len(new)
            if (cached + n + page_size - 1) // page_size > len(pages):
                raise ValueError("page list too short for the sequence")
            ids += new
            pos += range(cached, cached + n)
            slots += [pages[p // page_size] * page_size + p % page_size for p in range(cached, cached + n)]
            qsl.append(qsl[-1] + n)
            lens.append(cached + n)
            tables.append(list(pages) + [0] * (max_pages - len(pages)))
        as_t = lambda v, dt: torch.tensor(v, dtype=dt, device=device)
        logits_idx = None if need_all_logits else as_t([q - 1 for q in qsl[1:]], torch.int64)
        return ForwardBatch(
            input_ids=as_t(ids, torch.int64),
            positions=as_t(pos, torch.int64),
            slot_mapping=as_t(slots, torch.int64),
            block_tables=as_t(tables, torch.int32),
            seq_lens=as_t(lens, torch.int32),
            query_start_loc=as_t(qsl, torch.int32),
            max_query_len=max(len(s[0]) for s in seqs),
            max_seq_len=max(lens),
            seq_lens_cpu=lens,
            query_start_loc_cpu=qsl,
            logits_indices=logits_idx,
        )
