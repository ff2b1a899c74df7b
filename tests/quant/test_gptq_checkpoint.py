"""GPTQ checkpoints -> ember format. A reference packer written here from the AutoGPTQ layout (qweight packed
along K, qzeros along N, low bits first, v1 zeros stored minus one) builds checkpoints from known integer
codes; the converted QuantLinear must match the float64 matmul computed straight from those codes."""
import pytest
import torch

from ember.errors import WeightsError
from ember.layers.quant_linear import QuantLinear
from ember.quant.gptq_checkpoint import gptq_to_quantized, load_gptq_linear


def pack_words(vals: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ints along `dim` (32/bits per int32, low bits first), wrapping to signed int32."""
    f = 32 // bits
    v = vals.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], v.shape[-1] // f, f)
    words = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i in range(f):
        words |= (v[..., i] & ((1 << bits) - 1)) << (bits * i)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).movedim(-1, dim)


def make_checkpoint(K, N, bits, group_size, sym, act_order, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gs = K if group_size == -1 else group_size
    G = K // gs
    q = torch.randint(0, 1 << bits, (K, N), generator=gen)  # (K, N) codes, checkpoint order
    if act_order:  # g_idx as GPTQ writes it with desc_act: g_idx[order[i]] = i // gs
        order = torch.randperm(K, generator=gen)
        g_idx = torch.empty(K, dtype=torch.int64)
        g_idx[order] = torch.arange(K) // gs
    else:
        g_idx = torch.arange(K) // gs
    scales = (torch.rand(G, N, generator=gen) * 0.01 + 0.001).half()
    if sym:
        real_zero = torch.full((G, N), 1 << (bits - 1))
    else:  # real zeros 1..2^bits-1 (stored 0..2^bits-2), and for 4 bits also 2^bits (stored 2^bits-1)
        real_zero = torch.randint(1, (1 << bits) + (bits == 4), (G, N), generator=gen)
    ckpt = {
        "l.qweight": pack_words(q, bits, 0),
        "l.qzeros": pack_words(real_zero - 1, bits, 1),
        "l.scales": scales,
        "l.g_idx": g_idx.to(torch.int32),
    }
    # float64 weight (N, K) from the codes: W[n, k] = s[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])
    W = (scales.double()[g_idx] * (q.double() - real_zero.double()[g_idx])).T
    return ckpt, W


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_checkpoint_matches_float64(bits, group_size, sym, act_order):
    K, N = 256, 24
    ckpt, W = make_checkpoint(K, N, bits, group_size, sym, act_order)
    qt = load_gptq_linear(ckpt, "l", bits, group_size)
    assert (qt.perm is not None) == (act_order and group_size != -1)  # one group: order is irrelevant
    assert (qt.qzeros is None) == sym
    x = torch.randn(3, K, dtype=torch.float64)
    ref = x @ W.T
    out = QuantLinear(qt)(x.float()).double()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel  # float32 layer vs float64 math


def test_gptq_errors_name_the_tensor():
    ckpt, _ = make_checkpoint(128, 16, 4, 64, sym=False, act_order=False)
    with pytest.raises(WeightsError, match="l.scales"):
        load_gptq_linear(dict(ckpt, **{"l.scales": ckpt["l.scales"][:1]}), "l", 4, 64)
    with pytest.raises(WeightsError, match="l.qzeros"):
        load_gptq_linear({k: v for k, v in ckpt.items() if k != "l.qzeros"}, "l", 4, 64)
    with pytest.raises(WeightsError, match="g_idx"):
        load_gptq_linear(dict(ckpt, **{"l.g_idx": torch.zeros(128, dtype=torch.int32)}), "l", 4, 64)
    with pytest.raises(WeightsError, match="3 bits"):
        gptq_to_quantized(ckpt["l.qweight"], ckpt["l.qzeros"], ckpt["l.scales"], None, 3, 64)
