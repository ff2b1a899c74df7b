"""The paged KV cache: one tensor holding every layer's keys and values in fixed-size pages.

Layout (L, 2, P, Hk, page_size, D): per layer a key and a value tensor of P pages, each page holding
page_size positions of every KV head ("head-major pages", so one head's page is contiguous for the attention
kernels). Which pages belong to which sequence is the block manager's business (block tables)."""
from __future__ import annotations

import torch

from ember.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.empty(0, dtype=dtype).element_size()


class KVCache:
    def __init__(self, config: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device):
        self.page_size, self.num_pages = page_size, num_pages
        shape = (config.num_layers, 2, num_pages, config.num_kv_heads, page_size, config.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k_cache, v_cache), each (P, Hk, page_size, D) views into self.data."""
        return [(layer[0], layer[1]) for layer in self.data]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
