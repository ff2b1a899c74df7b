"""ember.tokenizer against independent references: the bundled SmolLM2 GGUF's vocabulary rebuilt by hand the
way the model ships its tokenizer.json, transformers' chat templating, a SentencePiece model trained here
(the `sentencepiece` package is the reference for ids), and llama.cpp's pre-tokenizer regexes run with the
`regex` package."""
from __future__ import annotations

import io
import logging
import random

import gguf
import pytest
import regex
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from ember.errors import ConfigError
from ember.io.bundled import bundled_model_path
from ember.tokenizer import Tokenizer

MIXED = (
    "The quick brown fox jumps over the lazy dog. It's 12345 steps, π≈3.14159; costs $1,000.50!\n"
    "def area(r: float) -> float:\n    if r < 0:\n        raise ValueError('neg')\n"
    "\treturn 3.14159 * r ** 2\n"
    "Emoji: 🙂👍🏽🇫🇷 — café, naïve, Ångström, über. "
    "日本語のテキスト、中文。Привет, мир!  trailing   \n\n"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? Answer in 日本語."},
]


def first_mismatch(a: list, b: list) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first mismatch at index {i}: {a[i:i + 5]} vs {b[i:i + 5]} (lengths {len(a)}, {len(b)})"


@pytest.fixture(scope="module")
def smol_meta() -> dict:
    reader = gguf.GGUFReader(bundled_model_path())
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer")}


@pytest.fixture(scope="module")
def smol(smol_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_meta)


def reference_smollm2(meta: dict) -> HFTokenizer:
    """SmolLM2's tokenizer as its tokenizer.json describes it, from the GGUF's tokens and merges."""
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    ref = HFTokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ref.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"]
    ref.add_special_tokens([AddedToken(t, special=True) for t, k in zip(tokens, types) if k == 3])
    return ref


def test_smollm2_gguf_matches_its_tokenizer_json(smol, smol_meta):
    ids = smol.encode(MIXED, add_bos=False)
    expected = reference_smollm2(smol_meta).encode(MIXED, add_special_tokens=False).ids
    assert ids == expected, first_mismatch(ids, expected)
    assert smol.decode(ids) == MIXED
    # Digits are split one per token: every token holding a digit is that digit alone.
    texts = [smol.decode([i]) for i in ids]
    digit_tokens = [t for t in texts if any(c in "0123456789" for c in t)]
    assert digit_tokens and all(len(t) == 1 for t in digit_tokens), digit_tokens
    assert len(digit_tokens) == sum(c in "0123456789" for c in MIXED)


def test_smollm2_special_tokens_from_metadata(smol, smol_meta):
    tokens = smol_meta["tokenizer.ggml.tokens"]
    bos, eos = smol_meta["tokenizer.ggml.bos_token_id"], smol_meta["tokenizer.ggml.eos_token_id"]
    assert smol.bos_id == bos and smol.id_to_token(bos) == tokens[bos] == "<|im_start|>"
    assert smol.eos_ids == {eos} and tokens[eos] == "<|im_end|>"
    assert smol.add_bos is smol_meta["tokenizer.ggml.add_bos_token"] is False
    assert smol.vocab_size == len(tokens)
    assert smol.special_ids == {i for i, k in enumerate(smol_meta["tokenizer.ggml.token_type"]) if k == 3}
    # Specials written in the text are single tokens; BOS is added once, never doubled.
    assert smol.encode("<|im_start|>user")[:1] == [bos]
    assert smol.encode("hi", add_bos=True)[0] == bos and smol.encode("hi")[0] != bos
    assert smol.encode("<|im_start|>hi", add_bos=True).count(bos) == 1
    smol_copy = Tokenizer.from_gguf_metadata(smol_meta)
    smol_copy.add_eos_ids([0])
    assert smol_copy.eos_ids == {eos, 0}


@pytest.fixture(scope="module")
def hf_smol():
    """transformers' tokenizer for the bundled GGUF (its chat template is the reference)."""
    transformers = pytest.importorskip("transformers")
    path = bundled_model_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_chat_template_matches_transformers(smol, hf_smol):
    hf = hf_smol
    for gen in (True, False):
        for conv in (CONVERSATION, CONVERSATION[1:]):
            expected = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert smol.apply_chat_template(conv, add_generation_prompt=gen) == expected


def test_chat_template_variables_and_fallback(smol):
    tpl = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad') }}"
           "{% endif %}{{ m.content | tojson }}{% endfor %}{{ eos_token }}{{ strftime_now('%Y') | length }}")
    tok = Tokenizer(smol.backend, bos="<|im_start|>", eos=["<|im_end|>"], add_bos=False, chat_template=tpl)
    expected = '<|im_start|>"é\\"x"<|im_end|>4'  # tojson keeps non-ASCII; strftime_now('%Y') has 4 chars
    assert tok.apply_chat_template([{"role": "user", "content": "é\"x"}]) == expected
    with pytest.raises(ConfigError, match="no bad"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])
    plain = Tokenizer(smol.backend, bos=None, eos=[], add_bos=False)
    assert plain.apply_chat_template(CONVERSATION[1:2]) == "user: What is 2+2?\nassistant:"


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    det = tok.detokenizer(skip_special_tokens)
    return [det.feed(i) for i in ids] + [det.flush()]


def test_incremental_detokenizer_byte_level(smol):
    ids = smol.encode(MIXED)
    pieces = stream(smol, ids)
    assert "".join(pieces) == smol.decode(ids) == MIXED
    assert not any("\ufffd" in p for p in pieces)
    # Some tokens end inside a character (emoji bytes), so some steps must have held text back.
    assert pieces.count("") > 1
    with_specials = smol.encode(smol.apply_chat_template(CONVERSATION))
    assert "".join(stream(smol, with_specials)) == smol.decode(with_specials)


# ---- SentencePiece (Llama 2 / Mistral style GGUF vocabularies) ------------------------------------------

def _corpus() -> list[str]:
    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "mon", "sel", "ar", "un", "the", "ing", "est", "pre", "lo", "qu", "ba"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) + rng.choice(".,!?;:")
             for _ in range(600)]
    return lines + ["Digits 0123456789 CAPS ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz",
                    "()[]{}<>'\"-"]


@pytest.fixture(scope="module")
def spm_pair():
    """A small SentencePiece BPE model (Llama's settings: byte fallback, identity normalization, no
    whitespace cleanup, dummy prefix) and its vocabulary exported as GGUF metadata, as llama.cpp does."""
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, model_type="bpe", vocab_size=800,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, num_threads=1, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    def kind(i: int) -> int:
        checks = [(sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6), (sp.is_unused, 5)]
        return next((k for check, k in checks if check(i)), 1)

    n = sp.get_piece_size()
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)], "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    return sp, Tokenizer.from_gguf_metadata(meta)


SPM_TEXTS = ["karimon thesel preing", " leading space", "  two  spaces  and trailing  ", "",
             "Unseen: café 🙂 日本語 Привет", "tabs\tand\nnewlines\n", "quba's (lo) [ar]! 42",
             "kakakaka tototo rir, . ?", "MONSEL Qu ba"]


def test_sentencepiece_ids_match(spm_pair):
    sp, tok = spm_pair
    assert tok.add_bos and tok.bos_id == sp.bos_id() and tok.eos_ids == {sp.eos_id()}
    for text in SPM_TEXTS + _corpus()[:50]:
        expected = sp.encode(text)
        ids = tok.encode(text, add_bos=False)
        assert ids == expected, f"{text!r}: " + first_mismatch(ids, expected)
        assert tok.decode(ids) == sp.decode(expected) == text
        assert tok.encode(text) == [sp.bos_id()] + expected


def test_incremental_detokenizer_byte_fallback(spm_pair):
    sp, tok = spm_pair
    emoji_ids = tok.encode("🙂", add_bos=False)[-4:]
    assert [tok.id_to_token(i) for i in emoji_ids] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    for text in SPM_TEXTS:
        ids = tok.encode(text)  # with BOS
        for skip in (False, True):
            pieces = stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in p for p in pieces)
        assert tok.decode(ids, skip_special_tokens=True) == text
    det = tok.detokenizer()
    assert [det.feed(i) for i in emoji_ids] == ["", "", "", "🙂"]


# ---- pre-tokenizers against llama.cpp's regexes ------------------------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA_CPP_SPLITS = {"smollm": [r"\p{N}", _GPT2], "llama-bpe": [_LLAMA3], "qwen2": [_QWEN2],
                    "gpt-2": [_GPT2], "made-up-name": [_GPT2]}


def llama_cpp_split(text: str, patterns: list[str]) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex splits every piece into matches and the gaps between."""
    pieces = [text]
    for pattern in patterns:
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[pos:m.start()], m.group()]
                pos = m.end()
            out.append(piece[pos:])
        pieces = [p for p in out if p]
    return pieces


@pytest.mark.parametrize("pre", sorted(LLAMA_CPP_SPLITS))
def test_pre_tokenizer_matches_llama_cpp(pre, caplog):
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": alphabet,
            "tokenizer.ggml.merges": []}
    with caplog.at_level(logging.WARNING, logger="ember.tokenizer_gguf"):
        tok = Tokenizer.from_gguf_metadata(meta)
    assert ("made-up-name" in caplog.text) == (pre == "made-up-name")
    text = MIXED + "I'M sure you'Ll x1234567y 99 bottles\r\n\r\n  end"
    got = [text[a:b] for _, (a, b) in tok.backend.pre_tokenizer.pre_tokenize_str(text)]
    assert got == llama_cpp_split(text, LLAMA_CPP_SPLITS[pre]), pre
    ids = tok.encode(text)
    assert tok.decode(ids) == text


# ---- save / load -----------------------------------------------------------------------------------

def test_save_then_load_gives_same_ids(smol, spm_pair, tmp_path):
    for name, tok, text in (("smol", smol, MIXED), ("spm", spm_pair[1], " ".join(SPM_TEXTS))):
        tok.save(tmp_path / name)
        back = Tokenizer.from_hf_folder(tmp_path / name)
        assert back.encode(text) == tok.encode(text)
        assert back.decode(back.encode(text)) == tok.decode(tok.encode(text))
        assert (back.bos_id, back.eos_ids, back.add_bos) == (tok.bos_id, tok.eos_ids, tok.add_bos)
        assert back.special_ids == tok.special_ids and back.vocab_size == tok.vocab_size
        assert back.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)


def test_loads_a_folder_saved_by_transformers(hf_smol, tmp_path):
    hf_smol.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.encode(MIXED) == hf_smol.encode(MIXED)
    assert (tok.bos_id, tok.eos_ids) == (hf_smol.bos_token_id, {hf_smol.eos_token_id})
    expected = hf_smol.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CONVERSATION) == expected


def test_bos_default_from_post_processor(smol, tmp_path):
    """A tokenizer.json whose post-processor adds BOS (Llama 3 style), no add_bos_token in the config."""
    backend = HFTokenizer.from_str(smol.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", smol.token_to_id("<|im_start|>"))])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": {"content": "<|im_start|>"}}')
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.add_bos and tok.encode("Hi 42") == backend.encode("Hi 42").ids
    assert tok.encode("<|im_start|>Hi") == backend.encode("Hi").ids
    assert tok.encode("Hi", add_bos=False) == backend.encode("Hi", add_special_tokens=False).ids


def test_hf_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)
