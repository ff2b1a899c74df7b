"""Rebuild a HF `tokenizers` tokenizer from the vocabulary a GGUF file carries in its metadata.

Two vocabulary kinds (tokenizer.ggml.model):
- "gpt2": byte-level BPE from tokens + merges; the pre-tokenizer is chosen by tokenizer.ggml.pre, with the
  split regexes llama.cpp (src/llama-vocab.cpp) and the models' own tokenizer.json files use.
- "llama": SentencePiece BPE (Llama 2, Mistral v0.1-0.3, CodeLlama). SentencePiece merges the adjacent pair
  whose concatenation has the highest score; a BPE with one merge (left, right) per way to split each piece,
  ranked by the piece's score, does the same. Characters outside the vocabulary fall back to <0xNN> byte
  tokens. The text is taken as-is (SentencePiece's "identity" normalization, as Llama's model uses).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from ember.errors import ConfigError

log = logging.getLogger(__name__)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# The Oniguruma regexes of the models' tokenizer.json files (llama.cpp rewrites (?i:...) for its own engine).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_RE = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
              r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
              r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_RE = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
             r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
             r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class _Pre:
    """How one family of byte-level BPE vocabularies splits text before BPE."""

    split: str | None = None  # a regex whose matches become words, then ByteLevel without its own regex
    digits: bool = False  # one word per digit, then ByteLevel with the GPT-2 regex
    ignore_merges: bool = False  # a word that is a whole vocabulary entry is taken as is (llama3, tekken)
    add_bos: bool = False  # llama.cpp's default when the GGUF has no add_bos_token


_DIGITS = _Pre(digits=True)
_GPT2 = _Pre()
_LLAMA3 = _Pre(split=_LLAMA3_RE, ignore_merges=True, add_bos=True)
_QWEN2 = _Pre(split=_QWEN2_RE)
_PRE_BY_NAME: dict[str, _Pre] = {
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    _DIGITS),
    **dict.fromkeys(("default", "gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    "chatglm-bpe": _Pre(split=_LLAMA3_RE),
    "tekken": _Pre(split=_TEKKEN_RE, ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4"), _Pre(split=_GPT4O_RE)),
}


def _texts(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _require(meta: dict, key: str) -> Any:
    if key not in meta:
        raise ConfigError(f"GGUF metadata has no {key!r}: the file carries no usable tokenizer; "
                          "pass an HF model folder with tokenizer.json instead")
    return meta[key]


def _byte_level_pre(name: str) -> tuple[Any, _Pre]:
    pre = _PRE_BY_NAME.get(name)
    if pre is None:
        log.warning("unknown tokenizer.ggml.pre %r: using plain byte-level splitting (GPT-2 regex); "
                    "token ids may differ from the model's own tokenizer", name)
        pre = _GPT2
    if pre.split is not None:
        steps = [pre_tokenizers.Split(Regex(pre.split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if pre.digits:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(steps), pre


def _build_gpt2(meta: dict, tokens: list[str]) -> tuple[HFTokenizer, bool]:
    merges = [tuple(m.split(" ", 1)) for m in _texts(_require(meta, "tokenizer.ggml.merges"))]
    vocab = {t: i for i, t in enumerate(tokens)}
    pre_tok, pre = _byte_level_pre(str(meta.get("tokenizer.ggml.pre", "default")))
    tok = HFTokenizer(BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    return tok, pre.add_bos


def _spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, best-scored piece first."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, normal[left], normal[right], left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def _build_spm(meta: dict, tokens: list[str], types: list[int]) -> tuple[HFTokenizer, bool]:
    scores = meta.get("tokenizer.ggml.scores")
    scores = [float(x) for x in scores] if scores is not None else [-float(i) for i in range(len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", types.index(UNKNOWN) if UNKNOWN in types else None)
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    model = BPE(vocab, _spm_merges(tokens, types, scores), unk_token=unk, fuse_unk=True,
                byte_fallback=BYTE in types)
    tok = HFTokenizer(model)
    # add_space_prefix: SentencePiece's add_dummy_prefix, "▁" before each text segment (llama.cpp also
    # adds it after a special token, as HF's legacy Llama tokenizer does).
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", SPM_SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPM_SPACE), spaces]) if prefix else spaces
    steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok, True


def build_from_gguf(meta: dict) -> tuple[HFTokenizer, bool]:
    """(tokenizer, llama.cpp's default for adding BOS) from a dict of GGUF metadata values."""
    kind = _require(meta, "tokenizer.ggml.model")
    tokens = _texts(_require(meta, "tokenizer.ggml.tokens"))
    types = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [NORMAL] * len(tokens)
    if kind == "gpt2":
        tok, add_bos = _build_gpt2(meta, tokens)
    elif kind == "llama":
        tok, add_bos = _build_spm(meta, tokens, types)
    else:
        raise ConfigError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE and "
                          "'llama' SentencePiece); use an HF model folder with tokenizer.json instead")
    # Control and unknown tokens are special (never split, skippable on decode); user-defined ones are
    # added tokens that are never split either.
    special = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    added = [AddedToken(t, special=False, normalized=False)
             for t, k in zip(tokens, types) if k == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(added)
    return tok, bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
