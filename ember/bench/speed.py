"""Speed measurement: prefill and streaming decode (CUDA graphs, each token read back by the host), peak
memory, and the fraction of the copy-bandwidth roofline reached by decode."""
from __future__ import annotations

import statistics
import time

import torch

from ember.engine.kv_cache import KVCache, kv_bytes_per_token
from ember.engine.prefill_runner import PrefillRunner
from ember.engine.runner import DecodeRunner, async_decode
from ember.forward_batch import ForwardBatch

PAGE = 64


def copy_bandwidth(device, nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(10):
            y.copy_(x)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3 / 10)
    del x, y
    return 2 * nbytes / min(times)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, device, prompt_len: int, gen_len: int, batch: int, weight_bytes: int, reps: int = 3,
            use_graphs: bool | None = None, seed: int = 0, max_seq_len: int | None = None) -> dict:
    """max_seq_len: the context the decode's block tables hold per sequence, as the engine's max_seq_len
    (default: just the prompt and the generated tokens). It sets the decode attention's split count."""
    cfg = model.config
    dtype = model.model.embed_tokens.weight.dtype
    pages_per_seq = -(-(prompt_len + gen_len + 1) // PAGE)
    kv = KVCache(cfg, batch * pages_per_seq + 1, PAGE, dtype, device)
    layers = kv.layers()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    tables = [list(range(b * pages_per_seq, (b + 1) * pages_per_seq)) for b in range(batch)]
    fb = ForwardBatch.build([(p, 0, t) for p, t in zip(prompts, tables)], PAGE, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def timed(forward) -> tuple[float, list[int]]:
        times, first = [], None
        with torch.inference_mode():
            for _ in range(reps + 1):  # the first run compiles kernels (and captures the graph)
                _sync(device)
                t0 = time.perf_counter()
                first = forward().argmax(-1).tolist()
                times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]), first

    # The engine's path (Generator): one sequence -> a CUDA graph per padded length (PrefillRunner);
    # eager is measured too, as the fallback and for batches.
    eager_s, first = timed(lambda: model(fb, layers))
    prefill_s, graph_used = eager_s, False
    prefill = PrefillRunner(model, kv, pages_per_seq, device, use_graphs)
    if batch == 1 and prefill.applies(prompt_len):
        prefill_s, first = timed(lambda: prefill.forward(prompts[0], tables[0]))
        graph_used = True

    table_pages = max(pages_per_seq, -(-(max_seq_len or 0) // PAGE))  # pages past the used ones: the scratch page
    runner = DecodeRunner(model, kv, batch, table_pages, device, use_graphs)
    decode_times = []
    for rep in range(reps + 1):  # the first pass captures the graph
        for b in range(batch):
            runner.set_sequence(b, first[b], prompt_len, tables[b])
        _sync(device)
        t0 = time.perf_counter()
        for _ in runner.greedy_tokens(batch, gen_len if rep else 2, async_decode()):
            pass  # the host reads every token, as a streaming server must (the generator's loop)
        if rep:
            decode_times.append(time.perf_counter() - t0)
    decode_s = statistics.median(decode_times)
    step_s = decode_s / gen_len
    kv_read = batch * kv_bytes_per_token(cfg, dtype) * (prompt_len + gen_len / 2)
    bytes_per_step = weight_bytes + kv_read
    bw = copy_bandwidth(device)
    return dict(
        prefill_tok_s=batch * prompt_len / prefill_s,
        prefill_eager_tok_s=batch * prompt_len / eager_s,
        prefill_graph=graph_used,
        decode_tok_s=batch * gen_len / decode_s,
        decode_ms_per_step=step_s * 1e3,
        vram_gib=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        bytes_per_step=int(bytes_per_step),
        copy_tb_s=bw / 1e12 if bw == bw else None,  # NaN where not measured (CPU): null in JSON
        roofline_frac=(bytes_per_step / step_s) / bw if bw == bw else None,
    )
