"""Text <-> token ids: a thin wrapper over HF `tokenizers`, chat templates rendered with jinja2, and a
detokenizer that streams text without splitting a UTF-8 character.

A tokenizer comes from an HF folder (tokenizer.json + tokenizer_config.json) or from GGUF metadata
(tokenizer_gguf.py rebuilds the vocabulary); save() writes the HF files so either loads back the same.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from ember.errors import ConfigError
from ember.tokenizer_gguf import build_from_gguf

_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# tokenizer_config.json key (ours; transformers ignores it) keeping every eos-like id across save/load.
_EOS_IDS_KEY = "ember_eos_token_ids"


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore the file from the model's source") from e


def _pick_template(value: Any) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of {name, template} (the "default" one)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode, decode and chat-format text for one model.

    bos_id: the BOS id or None. eos_id: the main EOS (the template's eos_token). eos_ids: every id that ends
    generation as named by the metadata/config (eos, plus eot/eom for GGUF); add_eos_ids() adds more (e.g.
    generation_config.json's)."""

    def __init__(self, tok: HFTokenizer, *, bos: str | None, eos: Iterable[str], add_bos: bool,
                 chat_template: str | None = None, eos_ids: Iterable[int] = ()):
        self._tok = tok
        self.bos_id: int | None = tok.token_to_id(bos) if bos else None
        named = [i for i in (tok.token_to_id(e) for e in eos if e) if i is not None]
        self.eos_id: int | None = named[0] if named else None  # the main one: eos_token of templates
        self.eos_ids: set[int] = set(named) | {int(i) for i in eos_ids}
        self.add_bos = add_bos and self.bos_id is not None
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None

    # ---- loading and saving -------------------------------------------------------------------------
    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, special_tokens_map.json, chat_template.jinja)."""
        folder = Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise ConfigError(f"no tokenizer.json in {folder} (looked for {', '.join(_HF_FILES)}); "
                              "ember needs the fast-tokenizer file: copy it from the model's source, "
                              "or load the GGUF")
        try:
            tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ConfigError(f"{folder / 'tokenizer.json'} cannot be read ({e}); restore it") from e
        # tokenizer_config.json wins over the older special_tokens_map.json.
        cfg = {**_read_json(folder / "special_tokens_map.json"),
               **_read_json(folder / "tokenizer_config.json")}
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        template = _pick_template(cfg.get("chat_template"))
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        add_bos = cfg.get("add_bos_token")
        if add_bos is None and bos:  # no flag: does tokenizer.json's post-processor add BOS?
            plain, full = (tok.encode("a", add_special_tokens=s).ids for s in (False, True))
            add_bos = full[:1] == [tok.token_to_id(bos)] and plain[:1] != full[:1]
        return cls(tok, bos=bos, eos=[eos] if eos else [], add_bos=bool(add_bos), chat_template=template,
                   eos_ids=cfg.get(_EOS_IDS_KEY, ()))

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> Tokenizer:
        """Build from a plain dict of GGUF metadata (tokenizer.ggml.* and tokenizer.chat_template)."""
        tok, add_bos = build_from_gguf(meta)
        def name(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tok.id_to_token(int(i)) if i is not None and int(i) >= 0 else None

        return cls(tok, bos=name("bos"), eos=[name("eos"), name("eot"), name("eom")], add_bos=add_bos,
                   chat_template=meta.get("tokenizer.chat_template"))

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json; from_hf_folder(folder) gives the same ids."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(out / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.id_to_token(self.bos_id) if self.bos_id is not None else None,
            "eos_token": self.id_to_token(self.eos_id) if self.eos_id is not None else None,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            _EOS_IDS_KEY: sorted(self.eos_ids),
        }
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")

    # ---- ids ----------------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. "<|im_start|>") become their ids.

        add_bos None follows the tokenizer's own default. A BOS is never added in front of one that the
        text already starts with. A post-processor's other tokens (EOS, suffixes) are not added: no model
        ember runs wants them in a prompt."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def add_eos_ids(self, ids: Iterable[int]) -> None:
        """Add ids that also end generation (e.g. generation_config.json's eos_token_id list)."""
        self.eos_ids.update(int(i) for i in ids)

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (batch encoding, offsets, inspection)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> set[int]:
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, s: str) -> int | None:
        return self._tok.token_to_id(s)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the model's jinja2 chat template, in a
        sandbox, with the variables HF passes (bos_token, eos_token, raise_exception, strftime_now, ...).

        A model without a template gets a plain fallback: one "role: content" line per message, then
        "assistant:" when add_generation_prompt. That is not a format the model was trained on."""
        if not self.chat_template:
            lines = [f"{m['role']}: {m['content']}\n" for m in messages]
            return "".join(lines) + ("assistant:" if add_generation_prompt else "")
        if self._template is None:
            self._template = _compile(self.chat_template)
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id}
        tokens = {k: self.id_to_token(v) if v is not None else "" for k, v in names.items()}
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **tokens, **extra)
        except _TemplateRaised as e:
            raise ConfigError(f"the model's chat template rejected the conversation: {e}") from e


class _TemplateRaised(Exception):
    """raise_exception() called by a chat template (e.g. roles that do not alternate)."""


def _raise(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Like transformers' filter: jinja2's own tojson HTML-escapes, which chat templates do not want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the model's chat template is not valid jinja2 ({e}); fix or remove it") from e


class IncrementalDetokenizer:
    """Turns ids fed one at a time into text pieces whose concatenation equals decode(all ids).

    Each step decodes a small window (the previous piece's tokens + the new ones) and emits what the new
    tokens added. While that text ends in U+FFFD the last token stopped inside a UTF-8 character (byte-level
    BPE or <0xNN> byte tokens), so it is held back until the character completes or flush() is called."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: a token boundary that is also a character boundary
        self._read = 0  # the text of ids[:read] has been emitted

    def feed(self, token_id: int) -> str:
        """Add one id; return only the text that is new and complete (possibly "")."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (a trailing incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        # Both texts start at the same token, so decoder effects at a window's start (SentencePiece's
        # stripped leading space) cancel out in the difference.
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(text) <= len(done) or (not final and text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]
