"""Allocation of KV-cache pages to sequences. Pure Python (no torch) so it is unit-tested on CPU.

NOTE: a sequence's page list only grows while it runs (block tables are append-only); pages come back
when the sequence finishes. Reference counts let later code share prefix pages between sequences."""
from __future__ import annotations

from ember.errors import OutOfMemoryError


class BlockManager:
    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self.free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self.ref = [0] * num_pages

    def pages_for(self, num_tokens: int) -> int:
        return (num_tokens + self.page_size - 1) // self.page_size

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise OutOfMemoryError(f"KV cache full: {n} pages needed, {len(self.free)} of {self.num_pages} free")
        pages = [self.free.pop() for _ in range(n)]
        for p in pages:
            self.ref[p] = 1
        return pages

    def grow(self, pages: list[int], num_tokens: int) -> None:
        """Append pages to `pages` (in place) until they hold num_tokens positions."""
        need = self.pages_for(num_tokens) - len(pages)
        if need > 0:
            pages.extend(self.allocate(need))

    def release(self, pages: list[int]) -> None:
        for p in pages:
            self.ref[p] -= 1
            if self.ref[p] == 0:
                self.free.append(p)
        pages.clear()

    @property
    def num_free(self) -> int:
        return len(self.free)
