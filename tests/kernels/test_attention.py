"""Paged attention kernels (split-K decode, varlen prefill over the paged cache, SDPA prefill) against
reference.paged_attention: GQA ratios 1/3/8, pages of 16/64, ragged lengths across pages, sliding window,
cached prefixes. Without CUDA the kernels run in Triton's CPU interpreter (on for this module only)."""

import pytest
import torch

from ember.kernels import ops
from ember.kernels import reference as ref

# p is rounded to fp16/bf16 before the P @ V product, as in every flash kernel
ATOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}
from tests.kernels.common import CANNOT_INTERPRET, DTYPES, assert_close, needs_cuda  # noqa: F401


def make_batch(news, cached, hq, hk, d, page, dtype, device, seed=0):
    """Random paged caches holding len = cached + new tokens per sequence on shuffled pages. Slots past a
    sequence's length and unused pages are NaN: a kernel that reads them poisons its output."""
    g = torch.Generator().manual_seed(seed)
    lens = [c + n for n, c in zip(news, cached)]
    n_pages = [(s + page - 1) // page for s in lens]
    total = sum(n_pages) + 2
    kc = torch.full((total, hk, page, d), float("nan"))
    vc = torch.full((total, hk, page, d), float("nan"))
    perm = torch.randperm(total, generator=g).tolist()
    tables = torch.zeros(len(news), max(n_pages), dtype=torch.int32)
    for b, s in enumerate(lens):
        pages, perm = perm[:n_pages[b]], perm[n_pages[b]:]
        tables[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        for i, p in enumerate(pages):
            m = min(page, s - i * page)
            kc[p, :, :m] = torch.randn(hk, m, d, generator=g)
            vc[p, :, :m] = torch.randn(hk, m, d, generator=g)
    qsl = [0]
    for n in news:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hq, d, generator=g)
    to = lambda x: x.to(device, dtype)
    return {"q": to(q), "k_cache": to(kc), "v_cache": to(vc), "block_tables": tables.to(device), "lens": lens,
            "qsl": qsl}


def run_both(kernel, bt, window, **kw):
    """(kernel output, reference output) for a batch from make_batch; the kernel writes into a NaN buffer."""
    q, kc, vc, tables = bt["q"], bt["k_cache"], bt["v_cache"], bt["block_tables"]
    dev = q.device
    lens = torch.tensor(bt["lens"], dtype=torch.int32, device=dev)
    qsl = torch.tensor(bt["qsl"], dtype=torch.int32, device=dev)
    scale = q.shape[-1] ** -0.5
    out = torch.full_like(q, float("nan"))
    got = kernel(q, kc, vc, tables, lens, qsl, scale, window, out=out, **kw)
    want = ref.paged_attention(q, kc, vc, tables, bt["lens"], bt["qsl"], scale, window)
    return got, want


GQA = [(4, 4), (6, 2), (8, 1)]  # ratios 1, 3, 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", GQA)
@pytest.mark.parametrize("page", [16, 64])
def test_decode(device, dtype, hq, hk, page):
    from ember.kernels.attention_decode import decode_attention
    d = 64 if page == 16 else 128
    window = 37 if hq == 6 else None
    # ragged: a first token, one inside a page, one on a page edge, several pages
    cached = [0, 9, 2 * page - 1, 3 * page + 5]
    bt = make_batch([1] * 4, cached, hq, hk, d, page, dtype, device, seed=hq + page)
    got, want = run_both(decode_attention, bt, window)
    assert_close(got, want, ATOL[dtype], f"decode window={window}")


@pytest.mark.parametrize("num_splits", [1, 2, 4, 8])
def test_decode_splits(device, num_splits):
    """Every split count gives the reference result, including splits left empty by short sequences (the
    last split program of each (sequence, kv head) merges them). A second launch on the same buffers is
    right too, and the split counters are back to zero: each launch resets what it used."""
    from ember.kernels import attention_decode
    bt = make_batch([1] * 4, [0, 40, 150, 77], 6, 2, 64, 16, torch.float16, device, seed=num_splits)
    for call in range(2):
        got, want = run_both(attention_decode.decode_attention, bt, None, num_splits=num_splits)
        assert_close(got, want, ATOL[torch.float16], f"decode num_splits={num_splits} call {call}")
        bt["q"] = bt["q"].flip(0)
    for counters in attention_decode._COUNTERS.get(str(device), []):
        assert not counters.any(), "split counters must be zero after a launch"


ROPE_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}  # rotated k: 1-2 ulp
# (cached, news, hq, hk, window, num_splits, padding token): lengths cached + news; None splits = ops, auto
ROPE_CASES = {
    "only-new-token-g1": ([0], [1], 2, 2, None, None, None),
    "g4-one-split": ([0, 70, 5], [1, 1, 1], 8, 2, None, 1, None),
    # 4 splits of 32 keys: the 71-long sequence's new token in split 2, the 6-long one's in split 0
    "g4-splits": ([0, 70, 5], [1, 1, 1], 8, 2, None, 4, None),
    "g1-splits": ([50, 9], [1, 1], 2, 2, None, 4, None),
    # window 40: keys [27, 67) in 2 splits; sequence 1 has no new token; token 1 (sequence 2) is padding
    "g3-window-gap-pad": ([40, 9, 2, 66], [1, 0, 1, 1], 6, 2, 40, 4, 1),
}


def rope_decode_batch(cached, news, hq, hk, d, dtype, device, seed, page=16):
    """make_batch's caches with the new tokens' slots poisoned (the op must not read them), the unrotated
    q, k, v as strided views of one fused QKV output, the new tokens' positions and slots, device lengths."""
    bt = make_batch(news, cached, hq, hk, d, page, dtype, device, seed=seed)
    tables = bt["block_tables"].cpu()
    pos = [bt["lens"][b] - 1 for b, n in enumerate(news) if n]
    slots = torch.tensor([int(tables[b, p // page]) * page + p % page
                          for b, p in zip([b for b, n in enumerate(news) if n], pos)])
    for cache in (bt["k_cache"], bt["v_cache"]):
        cache[slots // page, :, slots % page] = float("nan")
    qkv = torch.randn(len(pos), (hq + 2 * hk) * d, generator=torch.Generator().manual_seed(seed + 1))
    bt["qkv"] = qkv.to(device, dtype)
    q, k, v = bt["qkv"].split([hq * d, hk * d, hk * d], dim=-1)
    bt.update(q=q.view(-1, hq, d), k=k.view(-1, hk, d), v=v.view(-1, hk, d), slots=slots.to(device),
              pos=torch.tensor(pos).to(device), cos_sin=ref.rope_cos_sin(d, 4096, 10000.0).to(device),
              lens_t=torch.tensor(bt["lens"], dtype=torch.int32, device=device),
              qsl_t=torch.tensor(bt["qsl"], dtype=torch.int32, device=device))
    return bt


def rope_reference(bt, scale, window):
    """(output, k_cache, v_cache): reference.rope_store_kv then reference.paged_attention on cache copies."""
    kc, vc = bt["k_cache"].clone(), bt["v_cache"].clone()
    q_rot, _ = ref.rope_store_kv(bt["q"], bt["k"], bt["v"], bt["pos"], bt["cos_sin"], kc, vc, bt["slots"])
    return ref.paged_attention(q_rot, kc, vc, bt["block_tables"], bt["lens"], bt["qsl"], scale, window), kc, vc


def check_rope(got, bt, want, dtype, what, skip_row=None):
    """Output (a padding row excepted) and caches against rope_reference's; the k cache exactly equal
    outside the new slots."""
    out, kc_ref, vc_ref = want
    kc, vc = bt["k_cache"], bt["v_cache"]
    rows = [t for t in range(out.shape[0]) if t != skip_row]
    assert_close(got[rows], out[rows], ATOL[dtype], what)
    assert_close(vc, vc_ref, 0.0, f"{what}: v_cache")
    assert_close(kc, kc_ref, ROPE_TOL[dtype], f"{what}: k_cache")
    old = torch.ones(kc.shape[0] * kc.shape[2], dtype=torch.bool)
    old[bt["slots"][bt["slots"] >= 0].cpu()] = False
    flat = lambda c: c.transpose(1, 2).reshape(-1, *c.shape[1::2]).cpu()[old]  # (slots, Hk, D) not written
    assert_close(flat(kc), flat(kc_ref), 0.0, f"{what}: k_cache outside the new slots")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_decode_rope(device, dtype, case):
    """The fused rope + KV write + decode op equals reference.rope_store_kv then reference.paged_attention:
    the output (padding row excepted) and both caches after the call (the new k/v at their slots, nothing
    else touched, nothing for the padding token); q, k, v are not modified."""
    from ember.kernels.attention_decode import decode_attention_rope
    cached, news, hq, hk, window, num_splits, pad = ROPE_CASES[case]
    bt = rope_decode_batch(cached, news, hq, hk, 32, dtype, device, seed=len(case))
    if pad is not None:
        bt["slots"][pad] = -1
    want, qkv_in = rope_reference(bt, 0.2, window), bt["qkv"].clone()
    args = (bt["q"], bt["k"], bt["v"], bt["pos"], bt["cos_sin"], bt["k_cache"], bt["v_cache"], bt["slots"],
            bt["block_tables"], bt["lens_t"], bt["qsl_t"], 0.2, window)
    if num_splits is None:
        got = ops.decode_attention_rope(*args)
    else:  # the metadata and first cached block read before the PDL wait (early_reads) or after: the same
        got, again = (decode_attention_rope(*args, num_splits=num_splits, out=torch.full_like(bt["q"], float("nan")),
                                            early_reads=e) for e in (False, True))
        rows = [t for t in range(got.shape[0]) if t != pad]
        assert torch.equal(got[rows], again[rows]), "early_reads changed the result"
    check_rope(got, bt, want, dtype, f"decode_attention_rope {case}", skip_row=pad)
    assert torch.equal(bt["qkv"], qkv_in), "decode_attention_rope must not write q, k, v"


def test_attention_layer_decode(device, monkeypatch):
    """The attention layer sends a decode batch on the Triton path to the fused op, and gets the output and
    caches of its reference path (rope_store_kv, then paged attention; EMBER_NO_TRITON=1)."""
    from ember.config import ModelConfig
    from ember.forward_batch import ForwardBatch
    from ember.layers.attention import Attention
    from ember.layers.rope import RotaryEmbedding
    cfg = ModelConfig.from_hf({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                               "rope_theta": 10000.0, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                               "architectures": ["LlamaForCausalLM"]})
    torch.manual_seed(0)
    layer = Attention(cfg, RotaryEmbedding(cfg, 256))
    for p in layer.parameters():
        p.copy_(torch.randn_like(p) * 0.1)
    kc = torch.randn(8, 2, 16, 32)
    kv_ref, kv = (kc, kc.clone() + 1), (kc.clone(), kc.clone() + 1)
    batch = ForwardBatch.build([([1], 5, [3]), ([2], 20, [0, 6]), ([3], 0, [5])], 16, "cpu")
    x = torch.randn(3, 128)
    calls = []
    fused = ops.decode_attention_rope
    monkeypatch.setattr(ops, "decode_attention_rope", lambda *a: calls.append(1) or fused(*a))
    got = layer(x, batch, kv)
    assert calls == [1], "a decode batch on the Triton path goes through ops.decode_attention_rope"
    monkeypatch.setenv("EMBER_NO_TRITON", "1")
    want = layer(x, batch, kv_ref)
    assert calls == [1]
    assert_close(got, want, ATOL[torch.float32], "attention layer decode")
    assert_close(kv[0], kv_ref[0], ROPE_TOL[torch.float32], "k_cache")
    assert_close(kv[1], kv_ref[1], 0.0, "v_cache")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", GQA)
@pytest.mark.parametrize("page", [16, 64])
def test_prefill(device, dtype, hq, hk, page):
    """Chunks of new tokens after cached prefixes (prefix caching, chunked prefill) and plain prompts."""
    from ember.kernels.attention_prefill import prefill_attention
    d = 128 if page == 16 else 64
    window = 20 if hq == 8 else None
    bt = make_batch([7, 1, 33], [0, 2 * page + 3, 12], hq, hk, d, page, dtype, device, seed=hq * page)
    got, want = run_both(prefill_attention, bt, window, config=(32, 16, 4, 1))
    assert_close(got, want, ATOL[dtype], f"prefill window={window}")


def test_ops_paged_attention_dispatch(device):
    """ops.paged_attention (device tensors or host lists, decode or not) equals the reference, and a
    sequence with no new token is skipped."""
    for news, cached in (([1, 1, 0, 1], [5, 70, 3, 0]), ([3, 0, 1], [5, 3, 40])):
        bt = make_batch(news, cached, 6, 2, 64, 16, torch.float16, device)
        args = (bt["q"], bt["k_cache"], bt["v_cache"], bt["block_tables"])
        want = ref.paged_attention(*args, bt["lens"], bt["qsl"], 0.125, 9)
        lens = torch.tensor(bt["lens"], dtype=torch.int32, device=device)
        qsl = torch.tensor(bt["qsl"], dtype=torch.int32, device=device)
        got = ops.paged_attention(*args, lens, qsl, 0.125, 9, max_query_len=max(news))
        assert_close(got, want, ATOL[torch.float16], f"ops.paged_attention {news}")
        got = ops.paged_attention(*args, bt["lens"], bt["qsl"], 0.125, 9)
        assert_close(got, want, ATOL[torch.float16], f"ops.paged_attention host lists {news}")


def new_kv(bt):
    """The new tokens' keys/values (T, Hk, D), read back from the cache: the layer's k, v before store_kv."""
    kc, vc, tables, page = bt["k_cache"], bt["v_cache"], bt["block_tables"].cpu(), bt["k_cache"].shape[2]
    rows = []
    for b, (s, e) in enumerate(zip(bt["qsl"][:-1], bt["qsl"][1:])):
        for p in range(bt["lens"][b] - (e - s), bt["lens"][b]):
            rows.append((int(tables[b, p // page]), p % page))
    pages, offs = torch.tensor(rows).T.to(kc.device)
    return kc[pages, :, offs], vc[pages, :, offs]


@pytest.mark.parametrize("news,cached,window,via_sdpa", [([5, 33], [0, 0], None, True), ([33], [0], None, True),
                                                         ([5, 33], [0, 0], 8, False), ([5, 33], [0, 5], None, False)])
def test_prefill_sdpa_dispatch(device, monkeypatch, news, cached, window, via_sdpa):
    """Prompts without a cached prefix (and no window shorter than them) go through SDPA on the new k/v when
    the caller passes them (one sequence: SDPA's output returned as a view); everything else through the paged
    kernel. Both equal the reference."""
    from ember.kernels import attention
    calls = []
    sdpa = attention.prefill_sdpa
    monkeypatch.setattr(attention, "prefill_sdpa", lambda *a: calls.append(1) or sdpa(*a))
    bt = make_batch(news, cached, 6, 2, 64, 16, torch.float16, device)
    k, v = new_kv(bt)
    args = (bt["q"], bt["k_cache"], bt["v_cache"], bt["block_tables"])
    want = ref.paged_attention(*args, bt["lens"], bt["qsl"], 0.125, window)
    lens = torch.tensor(bt["lens"], dtype=torch.int32, device=device)
    qsl = torch.tensor(bt["qsl"], dtype=torch.int32, device=device)
    got = ops.paged_attention(*args, lens, qsl, 0.125, window, max_query_len=max(news), k=k, v=v,
                              seq_lens_cpu=bt["lens"], query_start_loc_cpu=bt["qsl"])
    assert_close(got, want, ATOL[torch.float16], "prefill via dispatch")
    assert calls == ([1] if via_sdpa else [])


# ---- GPU only: real sizes, CUDA graphs ----

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page", [16, 64])
def test_llama3_shapes_gpu(device, dtype, page):
    from ember.kernels.attention_decode import decode_attention
    from ember.kernels.attention_prefill import prefill_attention
    bt = make_batch([1] * 5, [0, 100, 1023, 2047, 3000], 32, 8, 128, page, dtype, device, seed=1)
    assert_close(*run_both(decode_attention, bt, None), ATOL[dtype], "decode")
    assert_close(*run_both(decode_attention, bt, 1000), ATOL[dtype], "decode window")
    bt = make_batch([300, 513, 64], [700, 0, 64], 32, 8, 128, page, dtype, device, seed=2)
    assert_close(*run_both(prefill_attention, bt, None), ATOL[dtype], "prefill")
    assert_close(*run_both(prefill_attention, bt, 256), ATOL[dtype], "prefill window")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("d", [32, 256])
def test_head_dims_gpu(device, d):
    from ember.kernels.attention_decode import decode_attention
    from ember.kernels.attention_prefill import prefill_attention
    bt = make_batch([1, 1], [77, 600], 8, 2, d, 32, torch.bfloat16, device, seed=d)
    assert_close(*run_both(decode_attention, bt, None), ATOL[torch.bfloat16], f"decode d={d}")
    bt = make_batch([200, 50], [0, 300], 8, 2, d, 32, torch.bfloat16, device, seed=d)
    assert_close(*run_both(prefill_attention, bt, None), ATOL[torch.bfloat16], f"prefill d={d}")


@pytest.mark.gpu
@needs_cuda
def test_decode_cuda_graph(device):
    """A captured decode step replays correctly after seq_lens, block tables and q change in place."""
    bt = make_batch([1] * 4, [3000, 3000, 3000, 3000], 32, 8, 128, 64, torch.bfloat16, device)
    q, kc, vc, tables = bt["q"], bt["k_cache"], bt["v_cache"], bt["block_tables"]
    lens = torch.tensor(bt["lens"], dtype=torch.int32, device=device)
    qsl = torch.arange(5, dtype=torch.int32, device=device)
    run = lambda: ops.paged_attention(q, kc, vc, tables, lens, qsl, 0.1, None, max_query_len=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for new_lens in ([1, 64, 65, 3001], [2999, 1, 1500, 200]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        tables.copy_(tables.flip(0))
        q.normal_()
        graph.replay()
        want = ref.paged_attention(q, kc, vc, tables, new_lens, list(range(5)), 0.1)
        assert_close(out, want, ATOL[torch.bfloat16], f"graph replay lens={new_lens}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_rope_cuda_graph(device, dtype):
    """Llama-3 heads, default split counts (up to 32): the fused op eager, then captured in a CUDA graph and
    replayed with new q/k/v (the split counters must be zero again after every launch)."""
    bt = rope_decode_batch([0, 100, 1022, 3000], [1] * 4, 32, 8, 128, dtype, device, seed=5, page=64)
    run = lambda: ops.decode_attention_rope(bt["q"], bt["k"], bt["v"], bt["pos"], bt["cos_sin"], bt["k_cache"],
                                            bt["v_cache"], bt["slots"], bt["block_tables"], bt["lens_t"],
                                            bt["qsl_t"], 0.1, None)
    want = rope_reference(bt, 0.1, None)
    check_rope(run(), bt, want, dtype, "eager")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for step in range(2):
        bt["qkv"].normal_()
        want = rope_reference(bt, 0.1, None)
        graph.replay()
        check_rope(out, bt, want, dtype, f"graph replay {step}")


def test_choose_num_splits(monkeypatch):
    """Splits per (sequence, kv head): a power of two for ~2 waves, at most MAX_SPLITS (32: with early reads
    2 programs fit an SM, and 64 splits of 8 kv heads took two waves, call J6), and at least MIN_SPLIT_TOKENS
    keys of capacity each. The grid depends only on (B, Hk, capacity): the same for any sequence length."""
    from ember.kernels import attention_decode as ad
    monkeypatch.setattr(ad, "_sm_count", lambda device: 132)  # an H100
    cpu = torch.device("cpu")
    assert ad.choose_num_splits(1, 8, 4096, cpu) == 32  # the engine's default tables (64 before J6)
    assert ad.choose_num_splits(1, 8, 704, cpu) == 32  # `ember bench`, 512 + 128 tokens (8 before J1)
    assert ad.choose_num_splits(1, 8, 256, cpu) == 8  # 32 keys of capacity a split at least
    assert ad.choose_num_splits(32, 8, 4096, cpu) == 2
    assert ad.choose_num_splits(1, 32, 4096, cpu) == 16
