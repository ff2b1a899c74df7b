"""`ember eval` on tiny random Llamas: perplexity, KL and top-1 against float64 math on transformers' logits,
window bookkeeping, errors, the CLI's JSON line, and the bpw of an RTN-converted folder."""
import json
import math

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from ember.bench.eval import evaluate, make_windows
from ember.config import EngineConfig
from ember.errors import ConfigError
from ember.quant.data import default_calibration_files, heldout_text_file
from tests.models.tiny import VARIANTS

CTX, WINDOWS = 64, 3
CPU = EngineConfig(device="cpu", dtype="float32")


def write_tiny(folder, seed: int):
    """A random Llama of tests.models.tiny's llama2 shape but with a 128-wide MLP (the ember format needs
    in_features divisible by 64); returns the transformers model (fp32, eval)."""
    import transformers

    cfg = dict(VARIANTS["llama2"], intermediate_size=128)
    cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "torch_dtype"})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and small weights: perturb so every tensor matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def train_tokenizer(text: str, path) -> None:
    """A byte-level BPE of 400 tokens (< the tiny models' 512), ids 0-2 = <unk> <s> </s> as in their config."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    tok.save(str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    text = heldout_text_file().read_text(encoding="utf-8")[:12000]
    root = tmp_path_factory.mktemp("eval")
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        hf = write_tiny(root / name, seed)
        train_tokenizer(text, root / name / "tokenizer.json")
        models[name] = hf
    ids = HFTokenizer.from_file(str(root / "a" / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    (root / "text.txt").write_text(text, encoding="utf-8")
    return root, text, ids, models


def hf_window_logits(hf, ids, ctx, n) -> list[torch.Tensor]:
    """float64 logits (ctx-1, V) of each window from transformers: the independent reference."""
    out = []
    with torch.no_grad():
        for w in range(n):
            x = torch.tensor([ids[w * ctx:(w + 1) * ctx]])
            out.append(hf(x).logits[0, :-1].double())
    return out


def test_ppl_matches_transformers(setup):
    root, text, ids, models = setup
    res = evaluate(root / "a", text, CTX, WINDOWS, engine=CPU)
    nll, count = 0.0, 0
    for w, logits in enumerate(hf_window_logits(models["a"], ids, CTX, WINDOWS)):
        targets = torch.tensor(ids[w * CTX + 1:(w + 1) * CTX])
        nll -= torch.log_softmax(logits, -1)[torch.arange(CTX - 1), targets].sum().item()
        count += CTX - 1
    ref = math.exp(nll / count)
    assert abs(res.ppl - ref) / ref < 1e-4, (res.ppl, ref)
    assert res.kld is None and res.top1 is None and res.bpw is None
    assert (res.tokens, res.windows, res.ctx) == (WINDOWS * (CTX - 1), WINDOWS, CTX)


def test_kl_with_itself_is_zero(setup):
    root, text, _, _ = setup
    res = evaluate(root / "a", text, CTX, 2, reference=root / "a", engine=CPU)
    assert abs(res.kld) < 1e-6 and res.top1 == 1.0
    assert res.ref_ppl == pytest.approx(res.ppl, rel=1e-6)


def test_kl_and_top1_match_float64(setup):
    root, text, ids, models = setup
    res = evaluate(root / "a", text, CTX, WINDOWS, reference=root / "b", engine=CPU)
    got = hf_window_logits(models["a"], ids, CTX, WINDOWS)
    ref = hf_window_logits(models["b"], ids, CTX, WINDOWS)
    kl = sum((torch.softmax(r, -1) * (torch.log_softmax(r, -1) - torch.log_softmax(g, -1))).sum().item()
             for r, g in zip(ref, got))
    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(ref, got))
    n = WINDOWS * (CTX - 1)
    assert kl / n > 1e-3  # two random models really differ, so the comparison below means something
    assert res.kld == pytest.approx(kl / n, rel=1e-4)
    assert res.top1 == pytest.approx(agree / n, abs=1.5 / n)  # at most one near-tie may flip


def test_windows_are_consecutive_slices():
    ids = list(range(1000))
    wins = make_windows(ids, 100, 4)
    assert wins == [ids[i * 100:(i + 1) * 100] for i in range(4)]
    assert len(make_windows(ids, 300, None)) == 3  # default: all complete windows


def test_too_short_text_says_how_many_tokens(setup):
    root, text, ids, _ = setup
    n = len(ids) // CTX + 1
    with pytest.raises(ConfigError, match=f"only {len(ids)} tokens.*{n} windows of {CTX}"):
        evaluate(root / "a", text, CTX, n, engine=CPU)
    with pytest.raises(ConfigError, match="only 3 tokens"):
        make_windows([1, 2, 3], 4, None)


def test_cli_json_and_bpw_of_rtn_folder(setup, tmp_path, capsys):
    from ember.cli import main
    from ember.quant.format import read_manifest
    from ember.quant.rtn_convert import rtn_convert

    root, _, _, _ = setup
    rtn_convert(root / "a", tmp_path / "q", bits=4, group_size=32, head_bits=8)
    argv = ["eval", "--model", str(tmp_path / "q"), "--reference", str(root / "a"), "--text",
            str(root / "text.txt"), "--ctx", str(CTX), "--windows", "2", "--device", "cpu", "--json", "-q"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ppl", "kld", "top1", "tokens", "windows", "bpw"} <= set(out)
    assert out["bpw"] == read_manifest(tmp_path / "q")["bpw"]
    # 4-bit codes + an fp16 scale per 32 inputs (+ the tiny segments table)
    assert 4.5 <= out["bpw"] < 4.6 and out["tokens"] == 2 * (CTX - 1)
    assert 0 < out["kld"] < 0.5 and out["top1"] > 0.5  # 4-bit RTN of the same model stays close


def test_bundled_texts_exist():
    files = default_calibration_files()
    assert len(files) >= 5 and all(f.stat().st_size > 1000 for f in files)
    held = heldout_text_file().read_text(encoding="utf-8")
    for f in files:  # the held-out text shares no long passage with the calibration set
        assert held[5000:5200] not in f.read_text(encoding="utf-8")
