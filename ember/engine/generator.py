"""Single-sequence generation over the paged KV cache: prefill the prompt, then decode token by token,
streaming text. The dynamic batching engine (scheduler + runner) replaces this loop later; it already uses
the same ForwardBatch, pages and sampler."""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ember.engine.block_manager import BlockManager
from ember.engine.kv_cache import KVCache
from ember.engine.prefill_runner import PrefillRunner
from ember.engine.runner import DecodeRunner, async_decode
from ember.engine.sampler import SamplingTensors, TokenCounts, sample
from ember.errors import PromptTooLongError
from ember.forward_batch import ForwardBatch
from ember.sampling_params import SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_memory_gib: float = 0.0
    finish_reason: str = ""  # "stop" (eos / stop string), "length" (max_new_tokens or context full)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first generated token comes out of the prefill; decode steps make the rest.
        n = self.generated_tokens - 1
        return n / self.decode_s if self.decode_s and n > 0 else 0.0

    def line(self) -> str:
        return (f"[prompt {self.prompt_tokens} tok, generated {self.generated_tokens} tok | "
                f"prefill {self.prefill_tok_s:.1f} tok/s | decode {self.decode_tok_s:.1f} tok/s | "
                f"peak memory {self.peak_memory_gib:.2f} GiB | finish: {self.finish_reason}]")


class StopStringFilter:
    """Holds back streamed text that might be the start of a stop string, and cuts at the first match."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.buf, self.stopped = "", False

    def push(self, text: str) -> str:
        self.buf += text
        for s in self.stops:
            i = self.buf.find(s)
            if i >= 0:
                self.stopped, out, self.buf = True, self.buf[:i], ""
                return out
        cut = max(len(self.buf) - self.keep, 0) if self.stops else len(self.buf)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Generator:
    def __init__(self, model, tokenizer, kv: KVCache, max_seq_len: int, device: torch.device):
        self.model, self.tokenizer, self.kv, self.device = model, tokenizer, kv, device
        self.max_seq_len = max_seq_len
        self.blocks = BlockManager(kv.num_pages - 1, kv.page_size)  # the last page is the runner's scratch page
        self.kv_layers = kv.layers()
        self.stats = GenerationStats()
        self.runner: DecodeRunner | None = None  # CUDA-graph decode, built on first use on the GPU
        self.prefill = PrefillRunner(model, kv, -(-max_seq_len // kv.page_size), device)  # graphs on the GPU

    def _forward(self, new: list[int], cached: int, pages: list[int]) -> torch.Tensor:
        batch = ForwardBatch.build([(new, cached, pages)], self.kv.page_size, self.device)
        with torch.inference_mode():
            return self.model(batch, self.kv_layers)  # (1, V) float32

    def _decoder(self, pages: list[int], greedy: bool, st, counts, gen, calls: int):
        """A function (token, position) -> next token for one decode step: CUDA graphs on the GPU. It is called
        at most `calls` times. With EMBER_ASYNC_DECODE=1, greedy decoding keeps the next step queued on the GPU
        while the host waits for, reads and yields this one's token (DecodeRunner.greedy_tokens)."""
        if self.device.type != "cuda":
            def eager(tok: int, pos: int) -> int:
                return int(sample(self._forward([tok], pos, pages), st, counts, [gen])[0])
            return eager
        if self.runner is None:
            self.runner = DecodeRunner(self.model, self.kv, 1, -(-self.max_seq_len // self.kv.page_size),
                                       self.device)
        runner, tokens = self.runner, []  # tokens: the greedy steps' iterator, from the first call on

        def graphed(tok: int, pos: int) -> int:
            if not tokens:
                runner.set_sequence(0, tok, pos, pages)
                tokens.append(runner.greedy_tokens(1, calls, async_decode()) if greedy else None)
            if greedy:
                return next(tokens[0])[0]  # the only host sync per token
            t = sample(runner.step(1, greedy=False), st, counts, [gen])
            runner.advance(t)
            return int(t[0])
        return graphed

    def stream_ids(self, prompt: list[int], params: SamplingParams) -> Iterator[tuple[int, str]]:
        """Yields (token_id, new_text) per generated token; sets self.stats as it goes."""
        n = len(prompt)
        if n == 0:
            raise PromptTooLongError("the prompt is empty: give at least one token")
        if n >= self.max_seq_len:
            raise PromptTooLongError(
                f"the prompt has {n} tokens but the context holds {self.max_seq_len} (max_seq_len) including "
                f"at least one generated token: shorten the prompt or raise --max-seq-len")
        budget = min(params.max_new_tokens, self.max_seq_len - n)
        eos = set() if params.ignore_eos else set(self.tokenizer.eos_ids)
        eos |= set(params.stop_token_ids)
        vocab = self.model.config.vocab_size
        st = SamplingTensors.from_params([params], self.device, vocab)
        counts = TokenCounts.from_prompts([prompt], vocab, self.device)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        plain_greedy = params.greedy and params.repetition_penalty == 1.0 and not (
            params.frequency_penalty or params.presence_penalty)
        detok, stops = self.tokenizer.detokenizer(), StopStringFilter(params.stop)
        self.stats = stats = GenerationStats(prompt_tokens=n)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        pages = self.blocks.allocate(self.blocks.pages_for(n + budget))
        try:
            t0 = time.perf_counter()
            tok = int(sample(self.prefill.forward(prompt, pages), st, counts, [gen])[0])
            stats.prefill_s = time.perf_counter() - t0
            t_dec = time.perf_counter()
            decode = self._decoder(pages, plain_greedy, st, counts, gen, budget - 1)
            pos = n
            for step in range(budget):
                stats.generated_tokens += 1
                if tok in eos:
                    stats.finish_reason = "stop"
                    break
                text = stops.push(detok.feed(tok))
                yield tok, text
                if stops.stopped:
                    stats.finish_reason = "stop"
                    break
                if step + 1 == budget:
                    break
                if not plain_greedy:  # penalties need the counts; plain greedy skips the host-to-device copy
                    counts.update(torch.tensor([tok], device=self.device))
                tok = decode(tok, pos)
                pos += 1
            if not stats.finish_reason:
                stats.finish_reason = "length"
                tail = stops.push(detok.flush()) + stops.flush()
                if tail:
                    yield -1, tail
            stats.decode_s = time.perf_counter() - t_dec
        finally:
            if self.runner is not None:
                self.runner.drain()  # a queued step (EMBER_ASYNC_DECODE) still writes into these pages
            self.blocks.release(pages)
            stats.peak_memory_gib = _peak_memory_gib(self.device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
