"""`ember eval`: perplexity of a model on a text and, against a reference model, the mean per-token KL
divergence KL(p_ref || p_model) and top-1 agreement.

The text is tokenized without BOS and its first N*ctx tokens are cut into N consecutive, non-overlapping
windows. Each window runs as one prefill from position 0 with logits for every position; positions 0..ctx-2
predict tokens 1..ctx-1, so a window scores ctx-1 tokens. Log-softmax is taken in float32 over row chunks,
so memory stays near a few (chunk, vocab) tensors beside the window's (ctx, vocab) logits; sums are
accumulated in float64. Both models are loaded at once (each with a KV cache for one window)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.config import EngineConfig
from ember.errors import ConfigError
from ember.forward_batch import ForwardBatch

log = logging.getLogger("ember")

CHUNK = 256  # logit rows per log-softmax: (256, 128k) float32 is 128 MB


@dataclass
class EvalResult:
    ppl: float  # exp(mean NLL) over the predicted tokens
    kld: float | None  # mean KL(p_ref || p_model) per predicted token, nats; None without a reference
    top1: float | None  # fraction of predicted positions where both argmaxes agree
    tokens: int  # predicted tokens: windows * (ctx - 1)
    windows: int
    bpw: float | None  # bits per weight of the decoder linears; None for a 16-bit model
    ctx: int
    ref_ppl: float | None = None
    seconds: float = 0.0

    def as_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def make_windows(ids: list[int], ctx: int, windows: int | None) -> list[list[int]]:
    """The first windows*ctx ids as `windows` consecutive lists of ctx ids (None: as many as fit)."""
    if ctx < 2:
        raise ConfigError(f"--ctx must be at least 2 (one token predicted per window), got {ctx}")
    n = len(ids) // ctx if windows is None else windows
    if n < 1 or n * ctx > len(ids):
        want = f"{n} windows of {ctx} tokens need {n * ctx}" if n >= 1 else f"one window needs {ctx}"
        raise ConfigError(f"the text has only {len(ids)} tokens and {want}: give a longer --text, or lower "
                          f"--windows / --ctx")
    return [ids[i * ctx:(i + 1) * ctx] for i in range(n)]


def window_logits(llm, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) float32 logits of one window, run as a single prefill from position 0."""
    blocks = llm.generator.blocks
    pages = blocks.allocate(blocks.pages_for(len(ids)))
    try:
        batch = ForwardBatch.build([(ids, 0, pages)], llm.kv.page_size, llm.device, need_all_logits=True)
        with torch.inference_mode():
            return llm.model(batch, llm.kv.layers())
    finally:
        blocks.release(pages)


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum over rows of -log softmax(logits)[target]; logits (T, V), targets (T,)."""
    total = 0.0
    for i in range(0, logits.shape[0], CHUNK):
        logp = torch.log_softmax(logits[i:i + CHUNK].float(), dim=-1)  # (c, V)
        total -= logp.gather(1, targets[i:i + CHUNK, None]).double().sum().item()
    return total


def kl_top1(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, int]:
    """(sum over rows of KL(softmax(ref) || softmax(got)), rows whose argmaxes agree); both (T, V)."""
    kl, agree = 0.0, 0
    for i in range(0, ref.shape[0], CHUNK):
        lp = torch.log_softmax(ref[i:i + CHUNK].float(), dim=-1)  # (c, V)
        lq = torch.log_softmax(got[i:i + CHUNK].float(), dim=-1)
        kl += (lp.exp() * (lp - lq)).sum(-1).double().sum().item()
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
    return kl, agree


def model_bpw(llm) -> float | None:
    """The manifest's `bpw` for an ember folder; for other quantized models (GPTQ) the stored bits of the
    decoder's quantized linears over their weights; None when nothing is quantized."""
    if llm.source.format == "ember":
        from ember.quant.format import read_manifest

        return read_manifest(llm.source.path).get("bpw")
    from ember.layers.quant_linear import QuantLinear

    bits = weights = 0
    for mod in llm.model.model.layers.modules():
        if isinstance(mod, QuantLinear):
            bits += mod.qt.stored_bits()
            weights += mod.in_features * mod.out_features
    return bits / weights if weights else None


def _load(path, engine: EngineConfig, progress: bool):
    from ember.llm import LLM

    return LLM(path, engine, progress=progress)


def score(llm, ref, wins: list[list[int]]) -> EvalResult:
    """Score a loaded model (and reference, or None) on token windows of equal length."""
    t0, ctx = time.perf_counter(), len(wins[0])
    nll = ref_nll = kl = 0.0
    agree = 0
    for w in wins:
        logits = window_logits(llm, w)[:-1]  # (ctx-1, V): position i predicts token i+1
        targets = torch.tensor(w[1:], device=logits.device)
        nll += nll_sum(logits, targets)
        if ref is not None:
            ref_logits = window_logits(ref, w)[:-1].to(logits.device)
            ref_nll += nll_sum(ref_logits, targets)
            d_kl, d_agree = kl_top1(ref_logits, logits)
            kl, agree = kl + d_kl, agree + d_agree
            del ref_logits
        del logits
    n = len(wins) * (ctx - 1)
    return EvalResult(
        ppl=math.exp(nll / n), kld=kl / n if ref is not None else None,
        top1=agree / n if ref is not None else None, tokens=n, windows=len(wins), bpw=model_bpw(llm), ctx=ctx,
        ref_ppl=math.exp(ref_nll / n) if ref is not None else None, seconds=time.perf_counter() - t0)


def _windows_for(llm, ref, text: str, ctx: int, windows: int | None) -> list[list[int]]:
    ids = llm.tokenizer.encode(text, add_bos=False)
    if ref is not None:
        if ref.config.vocab_size != llm.config.vocab_size:
            raise ConfigError(f"the reference has a vocabulary of {ref.config.vocab_size} tokens and the model "
                              f"{llm.config.vocab_size}: KL divergence needs the same tokenizer")
        if ref.tokenizer.encode(text, add_bos=False) != ids:
            log.warning("the reference's tokenizer splits the text differently; both are fed the model's ids")
    return make_windows(ids, ctx, windows)


def evaluate(model: str | Path | None, text: str, ctx: int = 2048, windows: int | None = None,
             reference: str | Path | None = None, engine: EngineConfig | None = None,
             progress: bool = False) -> EvalResult:
    """Score `model` on `text` (see the module docstring). engine.max_seq_len is replaced by ctx."""
    return evaluate_many([model], text, ctx, windows, reference, engine, progress)[0]


def evaluate_many(models: list, text: str, ctx: int = 2048, windows: int | None = None,
                  reference: str | Path | None = None, engine: EngineConfig | None = None,
                  progress: bool = False) -> list[EvalResult]:
    """evaluate() for several models against one reference, which is loaded once; models one at a time."""
    engine = dataclasses.replace(engine or EngineConfig(), max_seq_len=ctx)
    ref = _load(reference, engine, progress) if reference is not None else None
    out = []
    for model in models:
        t0 = time.perf_counter()
        llm = _load(model, engine, progress)
        res = score(llm, ref, _windows_for(llm, ref, text, ctx, windows))
        res.seconds = time.perf_counter() - t0
        out.append(res)
        if progress:
            print(f"{model}: ppl {res.ppl:.4f}, KL {res.kld}, top-1 {res.top1}", file=sys.stderr)
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def format_table(res: EvalResult, model: str, reference: str | None, text: str) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    rows = [
        ("model", f"{model} (bpw {fmt(res.bpw, '.3f')})"),
        ("reference", reference or "-"),
        ("text", f"{text}: {res.windows} windows x {res.ctx} tokens, {res.tokens} predicted"),
        ("perplexity", f"{res.ppl:.4f}" + (f"  (reference {res.ref_ppl:.4f})" if res.ref_ppl else "")),
        ("KL(ref || model)", f"{fmt(res.kld, '.5f')} nats/token"),
        ("top-1 agreement", fmt(res.top1, ".4f")),
        ("time", f"{res.seconds:.1f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def cmd_eval(args) -> int:
    from ember.cli import _engine

    if args.text is None:
        from ember.quant.data import heldout_text_file

        args.text = str(heldout_text_file())
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read --text {args.text}: {e}") from None
    res = evaluate(args.model, text, args.ctx, args.windows, args.reference, _engine(args),
                   progress=not args.quiet)
    print(format_table(res, str(args.model or "bundled"), args.reference, args.text))
    if args.json:
        print(res.as_json())
    return 0


def add_cli(sub, common) -> None:
    p = sub.add_parser("eval", help="perplexity, and KL divergence / top-1 agreement against a reference",
                       description="Score --model on consecutive --ctx-token windows of --text: perplexity, "
                       "and with --reference the mean KL(p_ref || p_model) per token and top-1 agreement.")
    p.add_argument("--reference", default=None, help="model giving the reference distribution (e.g. the "
                   "16-bit or GGUF original)")
    p.add_argument("--text", default=None, help="UTF-8 text file (default: the bundled held-out text, "
                   "Alice's Adventures in Wonderland)")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--windows", type=int, default=None, help="number of windows (default: all that fit)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line (the last)")
    common(p, False)
    p.set_defaults(func=cmd_eval)
