"""A whole GPTQ checkpoint folder (AutoGPTQ layout, written here by a reference packer) loads through
ember.load() and gives the logits of the same tiny Llama stored densely with the dequantized weights.

Layout packed here: qweight int32 (K*b/32, N), input k of column n at bits b*(k % (32/b)) of word
[k // (32/b), n]; qzeros int32 (G, N*b/32) packed the same way along N and holding zero - 1 ("v1");
scales fp16 (G, N); g_idx int32 (K,). W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])."""
import json

import pytest
import torch
from safetensors.torch import save_file

import ember
from ember.bench.eval import window_logits
from ember.layers.quant_linear import QuantLinear
from ember.quant.load import ConcatLinear

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 128, 256, 2, 4, 2, 256
HEAD_DIM = HIDDEN // HEADS
LINEARS = {  # HF name -> (out N, in K)
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER),
}


def pack_int32(vals: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Unsigned values < 2^bits packed 32/bits per int32 word along `axis`, first value in the low bits."""
    per = 32 // bits
    v = vals.to(torch.int64)
    if axis == 1:
        v = v.T
    rows = v.shape[0] // per
    words = torch.zeros(rows, v.shape[1], dtype=torch.int64)
    for j in range(per):
        words += v[j::per] << (bits * j)  # row r takes values r*per + j
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.T.contiguous() if axis == 1 else words


def gptq_linear(N, K, bits, group_size, sym, g_idx, gen):
    """Random codes/scales/zeros for one linear -> (checkpoint tensors, dense float64 W (N, K))."""
    gs = K if group_size == -1 else group_size
    G = K // gs
    q = torch.randint(0, 1 << bits, (K, N), generator=gen)
    scales = (torch.rand(G, N, generator=gen) * 0.04 / (1 << bits) + 0.002).half()
    if sym:
        zero = torch.full((G, N), 1 << (bits - 1))
    else:  # 4-bit v1 zeros may reach 16 (stored 15); 8-bit ones stop at 255 (stored 254)
        zero = torch.randint(1, (1 << bits) + (bits == 4), (G, N), generator=gen)
    W = (scales.double()[g_idx] * (q.double() - zero.double()[g_idx])).T
    return {"qweight": pack_int32(q, bits, 0), "qzeros": pack_int32(zero - 1, bits, 1), "scales": scales,
            "g_idx": g_idx.to(torch.int32)}, W


def act_order_g_idx(K, gs, gen):
    """g_idx as GPTQ with desc_act writes it: the i-th input in quantization order belongs to group i // gs."""
    order = torch.randperm(K, generator=gen)
    g = torch.empty(K, dtype=torch.int64)
    g[order] = torch.arange(K) // gs
    return g


def write_folders(root, bits, group_size, desc_act, sym):
    """The GPTQ folder and a dense fp32 folder of the same model; q/k/v get separate act-order permutations
    (ember runs them as a ConcatLinear), gate/up share one (they fuse)."""
    gen = torch.Generator().manual_seed(bits * 100 + group_size + 7 * desc_act + sym)
    half = lambda t: t.half().float()  # exact in both folders
    dense = {"model.embed_tokens.weight": half(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5),
             "model.norm.weight": half(1 + 0.1 * torch.randn(HIDDEN, generator=gen)),
             "lm_head.weight": half(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.1)}
    gptq = {k: v.half() for k, v in dense.items()}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for n in ("input_layernorm", "post_attention_layernorm"):
            dense[f"{p}.{n}.weight"] = half(1 + 0.1 * torch.randn(HIDDEN, generator=gen))
            gptq[f"{p}.{n}.weight"] = dense[f"{p}.{n}.weight"].half()
        shared = {}
        for name, (N, K) in LINEARS.items():
            gs = K if group_size == -1 else group_size
            if not desc_act:
                g_idx = torch.arange(K) // gs
            elif name.startswith(("mlp.gate", "mlp.up")):
                g_idx = shared.setdefault("gate_up", act_order_g_idx(K, gs, gen))
            else:
                g_idx = act_order_g_idx(K, gs, gen)
            tensors, W = gptq_linear(N, K, bits, group_size, sym, g_idx, gen)
            gptq.update({f"{p}.{name}.{k}": v for k, v in tensors.items()})
            dense[f"{p}.{name}.weight"] = W.float().contiguous()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
           "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 256,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
           "eos_token_id": 2, "torch_dtype": "float16"}
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
            "checkpoint_format": "gptq"}
    for name, tensors, extra in (("gptq", gptq, {"quantization_config": qcfg}), ("dense", dense, {})):
        folder = root / name
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({**cfg, **extra}))
        write_tokenizer(folder)
    return root / "gptq", root / "dense"


def write_tokenizer(folder) -> None:
    """ember.load needs a tokenizer.json; the test feeds ids directly, so a one-word vocabulary will do."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>")).save(
        str(folder / "tokenizer.json"))


# Pairwise cover of bits x group size x desc_act x sym (every pair of values occurs).
CASES = [(4, 32, True, True), (4, 128, False, False), (4, -1, True, False),
         (8, 32, False, False), (8, 128, True, True), (8, -1, False, True)]


@pytest.mark.parametrize("bits,group_size,desc_act,sym", CASES)
def test_gptq_folder_matches_dense(tmp_path, bits, group_size, desc_act, sym):
    gptq_dir, dense_dir = write_folders(tmp_path, bits, group_size, desc_act, sym)
    q = ember.load(gptq_dir, device="cpu", dtype="float32", max_seq_len=128)
    d = ember.load(dense_dir, device="cpu", dtype="float32", max_seq_len=128)
    assert q.source.format == "gptq" and d.source.format == "hf"
    attn = q.model.model.layers[0].self_attn.qkv_proj
    mlp = q.model.model.layers[0].mlp.gate_up_proj
    # act-order q/k/v with different permutations cannot fuse; gate/up (one permutation) always do
    one_group = group_size == -1 or group_size >= HIDDEN
    assert isinstance(attn, ConcatLinear if desc_act and not one_group else QuantLinear)
    assert isinstance(mlp, QuantLinear)
    ids = torch.randint(3, VOCAB, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    got, ref = window_logits(q, ids), window_logits(d, ids)
    err = (got - ref).abs()
    assert err.max() < 1e-4 * max(1.0, ref.abs().max().item()), (
        f"max |gptq - dense| {err.max():.2e} at flat index {int(err.argmax())}")
    assert ref.std() > 0.1  # the logits are not trivially flat
