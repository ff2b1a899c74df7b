"""Sampler and SamplingParams against plain float64 / numpy references of the definitions."""
import dataclasses

import numpy as np
import pytest
import torch

from ember.engine.sampler import (
    SamplingTensors,
    TokenCounts,
    apply_penalties,
    argmax,
    make_generators,
    sample,
)
from ember.errors import ConfigError
from ember.sampling_params import SamplingParams

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def _run(logits, params, counts=None, gens=None):
    st = SamplingTensors.from_params(params, logits.device, logits.shape[-1])
    return sample(logits, st, counts, gens)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_filter(logits, temperature, top_k, top_p, min_p):
    """The definitions, in float64: returns {token: renormalised probability} of the allowed tokens."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    keep = np.argsort(-x, kind="stable")                      # most likely first
    if top_k:
        keep = keep[:top_k]
    cum = np.cumsum(_softmax(x[keep]))
    keep = keep[:int(np.searchsorted(cum, top_p)) + 1]        # smallest prefix with mass >= top_p
    p = _softmax(x[keep])
    keep = keep[p >= min_p * p.max()]
    return dict(zip(keep.tolist(), _softmax(x[keep]).tolist()))


def _midpoint_params(logits, temperature, top_k, n_top_p, n_min_p):
    """top_p / min_p halfway between the values that keep n and n+1 tokens, far from any rounding edge."""
    x = np.sort(np.asarray(logits, np.float64) / temperature)[::-1][:top_k or None]
    top_p, min_p = 1.0, 0.0
    if n_top_p:
        cum = np.cumsum(_softmax(x))
        top_p = (cum[n_top_p - 2] + cum[n_top_p - 1]) / 2
        x = x[:n_top_p]
    if n_min_p:
        ratio = np.exp(x - x[0])
        min_p = (ratio[n_min_p - 1] + ratio[n_min_p]) / 2
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=float(top_p), min_p=float(min_p))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_equals_argmax(device, dtype):
    torch.manual_seed(0)
    # Small integers make ties frequent: the first maximum must win, as in torch.argmax.
    logits = torch.randint(-4, 5, (16, 40), device=device).to(dtype)
    logits[8:] = torch.randn(8, 40, device=device).to(dtype)
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=1.0, top_k=5)
              for i in range(16)]
    out = _run(logits, params)
    assert out.dtype == torch.int64 and out.shape == (16,)
    assert torch.equal(out[::2], logits.argmax(dim=-1)[::2])
    assert torch.equal(_run(logits, [SamplingParams(temperature=0.0)] * 16), logits.argmax(dim=-1))


@pytest.mark.parametrize("device", DEVICES)
def test_low_temperature_top_k_one_and_tiny_top_p_give_argmax(device):
    torch.manual_seed(1)
    logits = torch.randn(64, 50, device=device)
    best = logits.argmax(dim=-1)
    logits[torch.arange(64), best] += 0.05  # a gap of >= 0.05 / 1e-3 = 50 nats to the runner-up
    cold = SamplingParams(temperature=1e-3)
    assert not cold.greedy  # the sampling path is what we test here
    for _ in range(5):
        assert torch.equal(_run(logits, [cold] * 64), best)
        assert torch.equal(_run(logits, [SamplingParams(temperature=1.5, top_k=1)] * 64), best)
        # A top_p so small that 1 - top_p rounds to 1 in float32 must still keep the most likely token.
        assert torch.equal(_run(logits, [SamplingParams(temperature=1.0, top_p=1e-9)] * 64), best)
    assert SamplingParams(temperature=1e-6).greedy


CASES = [  # (temperature, top_k, tokens kept by top-p, tokens kept by min-p)
    (1.3, 0, None, None), (1.0, 4, None, None), (0.8, 0, 5, None), (1.5, 0, None, 3), (1.2, 7, 4, 3),
]


@pytest.mark.parametrize("device", DEVICES)
def test_filters_allowed_set_and_frequencies(device):
    rng = np.random.default_rng(2)
    v, n = 12, 3000
    rows, params, refs = [], [], []
    for case in CASES:
        logits = rng.normal(0.0, 1.5, v)
        p = _midpoint_params(logits, *case)
        rows += [torch.tensor(logits, dtype=torch.float32)] * n
        params += [p] * n
        refs.append(ref_filter(logits, p.temperature, p.top_k, p.top_p, p.min_p))
    torch.manual_seed(3)
    out = _run(torch.stack(rows).to(device), params).cpu().numpy().reshape(len(CASES), n)
    for case, ref, drawn in zip(CASES, refs, out):
        _check_distribution(drawn, ref, v, case)
    assert [len(r) for r in refs] == [12, 4, 5, 3, 3]  # the cases really exercise each filter


def _check_distribution(drawn, ref, v, case):
    outside = sorted(set(drawn.tolist()) - set(ref))
    assert not outside, f"case {case}: drew tokens {outside} outside the allowed set {sorted(ref)}"
    observed = np.bincount(drawn, minlength=v)
    expected = np.zeros(v)
    expected[list(ref)] = len(drawn) * np.array(list(ref.values()))
    allowed = list(ref)
    chi2 = float((((observed - expected)[allowed]) ** 2 / expected[allowed]).sum())
    df = max(len(allowed) - 1, 1)
    assert chi2 < df + 6 * np.sqrt(2 * df), \
        f"case {case}: chi2 {chi2:.1f} with {df} dof; observed {observed}, expected {expected}"


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_follow_the_distribution(device):
    logits = np.random.default_rng(4).normal(0.0, 1.0, 10)
    p = SamplingParams(temperature=0.9, top_k=6)
    params = [SamplingParams(temperature=0.9, top_k=6, seed=s) for s in range(2000)]
    x = torch.tensor(logits, dtype=torch.float32, device=device).expand(2000, 10)
    out = _run(x, params, gens=make_generators(params, device)).cpu().numpy()
    _check_distribution(out, ref_filter(logits, p.temperature, 6, 1.0, 0.0), 10, "seeded")


def _penalty_setup(device, dtype):
    torch.manual_seed(5)
    v = 16
    logits = (torch.randn(4, v) * 3).to(dtype).to(device)
    prompts = [[1, 2, 2, 9], [], [3, 4], [0, 15, 7]]
    outputs = [[2, 5, 5], [6, 6, 6], [4, 8, 11], [1, 7, 1]]
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.3),
              SamplingParams(repetition_penalty=0.8, presence_penalty=1.1),
              SamplingParams(frequency_penalty=-0.7),
              SamplingParams()]
    return logits, prompts, outputs, params


def ref_penalties(logits, prompts, outputs, params):
    out = logits.double().cpu().numpy().copy()
    for b, (prompt, gen, p) in enumerate(zip(prompts, outputs, params)):
        for t in range(out.shape[1]):
            if t in prompt or t in gen:
                rp = p.repetition_penalty
                out[b, t] = out[b, t] / rp if out[b, t] > 0 else out[b, t] * rp
            c = gen.count(t)
            out[b, t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalties_match_float64_reference(device, dtype):
    logits, prompts, outputs, params = _penalty_setup(device, dtype)
    st = SamplingTensors.from_params(params, device, logits.shape[-1])
    counts = TokenCounts.from_prompts(prompts, logits.shape[-1], device)
    for step in range(3):
        counts.update(torch.tensor([o[step] for o in outputs], device=device))
    rebuilt = TokenCounts.from_prompts(prompts, logits.shape[-1], device, outputs=outputs)
    assert torch.equal(counts.counts, rebuilt.counts) and torch.equal(counts.seen, rebuilt.seen)
    before = logits.clone()
    got = apply_penalties(logits, st, counts).double().cpu().numpy()
    assert torch.equal(logits, before), "apply_penalties must not modify its input"
    want = ref_penalties(logits, prompts, outputs, params)
    bad = np.argwhere(~np.isclose(got, want, rtol=1e-6, atol=1e-5))
    assert len(bad) == 0, f"first mismatch at {tuple(bad[0])}: {got[tuple(bad[0])]} vs {want[tuple(bad[0])]}"
    assert not np.allclose(got[:3], logits.double().cpu().numpy()[:3])  # penalties did something
    # Greedy rows take the argmax of the penalized logits.
    greedy = [SamplingParams(temperature=0.0, repetition_penalty=p.repetition_penalty,
                             frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty)
              for p in params]
    assert _run(logits, greedy, counts).cpu().tolist() == want.argmax(axis=-1).tolist()


def _decode(step_logits, params, row_prompts, device):
    """Sample step by step, feeding the sampled tokens back into the penalty counts."""
    st = SamplingTensors.from_params(params, device, step_logits[0].shape[-1])
    counts = TokenCounts.from_prompts(row_prompts, step_logits[0].shape[-1], device)
    gens = make_generators(params, device)
    tokens = []
    for logits in step_logits:
        t = sample(logits.to(device), st, counts, gens)
        counts.update(t)
        tokens.append(t.cpu())
    return torch.stack(tokens, dim=1)  # (B, steps)


@pytest.mark.parametrize("device", DEVICES)
def test_seed_gives_same_tokens_alone_and_in_a_batch(device):
    torch.manual_seed(6)
    v, steps, target = 100, 8, 5
    mine = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=1234)
    others = [SamplingParams(temperature=0.0), SamplingParams(seed=7), SamplingParams(temperature=1.4),
              SamplingParams(top_p=0.5, min_p=0.1), SamplingParams(frequency_penalty=1.0, seed=1),
              SamplingParams(top_k=3), SamplingParams(temperature=2.0, seed=99)]
    batch = others[:target] + [mine] + others[target:]
    my_logits = [torch.randn(1, v) for _ in range(steps)]
    batch_logits = [torch.cat([torch.randn(target, v), x, torch.randn(2, v)]) for x in my_logits]
    prompts = [[1, 2, 3]] * 8
    alone = _decode(my_logits, [mine], prompts[:1], device)[0]
    torch.manual_seed(123)  # the global generator's state must not matter to seeded rows
    again = _decode(my_logits, [mine], prompts[:1], device)[0]
    batched = _decode(batch_logits, batch, prompts, device)[target]
    assert alone.tolist() == again.tolist() == batched.tolist()
    other_seed = _decode(my_logits, [dataclasses.replace(mine, seed=1235)], prompts[:1], device)
    assert other_seed[0].tolist() != alone.tolist()  # the seed is really used


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_does_not_synchronise_on_cuda():
    params = [SamplingParams(top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
                             seed=3), SamplingParams(temperature=0.0), SamplingParams()]
    logits = torch.randn(3, 1000, device="cuda", dtype=torch.bfloat16)
    st = SamplingTensors.from_params(params, "cuda", 1000)
    counts = TokenCounts.from_prompts([[1, 2], [3], []], 1000, "cuda")
    gens = make_generators(params, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        counts.update(sample(logits, st, counts, gens))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("bad", [
    {"temperature": -0.1}, {"temperature": float("nan")}, {"temperature": "hot"}, {"top_k": -1},
    {"top_k": 2.5}, {"top_k": True}, {"top_p": 0.0}, {"top_p": 1.01}, {"min_p": -0.1}, {"min_p": 1.5},
    {"repetition_penalty": 0.0}, {"frequency_penalty": 2.5}, {"presence_penalty": -3.0}, {"seed": -1},
    {"seed": 1.5}, {"seed": 2**63}, {"max_new_tokens": 0}, {"stop": ("",)}, {"stop": "abc"}, {"stop": (1,)},
    {"stop_token_ids": (-1,)}, {"stop_token_ids": ("a",)}, {"ignore_eos": "yes"},
])
def test_invalid_params_raise(bad):
    name = next(iter(bad))
    with pytest.raises(ConfigError, match=name):
        SamplingParams(**bad)


def test_from_kwargs():
    with pytest.raises(ConfigError, match="tempreature.*valid ones are: temperature, top_k"):
        SamplingParams.from_kwargs(tempreature=0.5)
    p = SamplingParams.from_kwargs(temperature=1, stop=["\n\n"], stop_token_ids=[2])
    assert p.temperature == 1.0 and isinstance(p.temperature, float)
    assert p.stop == ("\n\n",) and p.stop_token_ids == (2,) and hash(p) == hash(SamplingParams(
        temperature=1.0, stop=("\n\n",), stop_token_ids=(2,)))


@pytest.mark.parametrize("v", [128256, 49152, 32000, 10007])
def test_two_pass_argmax_equals_torch_with_ties(v):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(5, v, generator=g)
    x[1, 17] = x[1, v - 3] = 100.0  # a tie in different chunks: the first index wins
    x[2, :] = 0.0  # everything tied
    x[3, v - 1] = 50.0  # the last element
    x[4, 3] = x[4, 4] = 60.0  # a tie inside one chunk
    assert torch.equal(argmax(x), x.argmax(dim=-1))
