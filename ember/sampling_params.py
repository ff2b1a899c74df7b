"""Per-request sampling settings: one frozen dataclass, validated once, read by the sampler and the stop
logic.

Each field carries its one-line help in `metadata["help"]`, so the CLI flags and the API keyword arguments
built from this class cannot drift from it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ember.errors import ConfigError


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request, and when to stop.

    Processing order in the sampler: penalties -> temperature -> top-k -> top-p -> min-p -> draw.
    """

    temperature: float = field(default=0.7, metadata=_help(
        "Divides the logits; 0 means greedy (argmax). Values below 1e-5 are treated as 0."))
    top_k: int = field(default=0, metadata=_help(
        "Keep only the k most likely tokens; 0 turns it off."))
    top_p: float = field(default=1.0, metadata=_help(
        "Nucleus sampling: keep the smallest set of most likely tokens whose probability sums to >= top_p; "
        "1.0 turns it off."))
    min_p: float = field(default=0.0, metadata=_help(
        "Drop tokens whose probability is below min_p times the most likely token's; 0 turns it off."))
    repetition_penalty: float = field(default=1.0, metadata=_help(
        "Tokens seen in the prompt or output: positive logits are divided by it, negative ones multiplied "
        "(HF/llama.cpp); 1.0 turns it off."))
    frequency_penalty: float = field(default=0.0, metadata=_help(
        "Subtracted from a token's logit once per time it was generated (OpenAI), in [-2, 2]."))
    presence_penalty: float = field(default=0.0, metadata=_help(
        "Subtracted from a token's logit if it was generated at least once (OpenAI), in [-2, 2]."))
    seed: int | None = field(default=None, metadata=_help(
        "Seed of this request's own random generator: the same seed gives the same tokens, alone or "
        "batched; None uses the global generator."))
    max_new_tokens: int = field(default=256, metadata=_help(
        "Stop after generating this many tokens."))
    stop: tuple[str, ...] = field(default=(), metadata=_help(
        "Stop when the output text contains any of these strings (they are not returned)."))
    stop_token_ids: tuple[int, ...] = field(default=(), metadata=_help(
        "Stop when any of these token ids is generated, in addition to the model's end-of-sequence ids."))
    ignore_eos: bool = field(default=False, metadata=_help(
        "Keep generating past the model's end-of-sequence tokens (for benchmarks)."))

    def __post_init__(self) -> None:
        # Lists (from JSON or the CLI) become tuples so the dataclass stays hashable.
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._check_floats()
        self._check_ints()
        self._check_stops()
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    def _check_floats(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                     "presence_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")

    def _check_ints(self) -> None:
        for name in ("top_k", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ConfigError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")

    def _check_stops(self) -> None:
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        ids = self.stop_token_ids
        if not isinstance(ids, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"stop_token_ids must be a list of token ids (integers >= 0), got {ids!r}")

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax (temperature 0 or below 1e-5)."""
        return self.temperature < GREEDY_TEMPERATURE

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **kw: Any) -> SamplingParams:
        """Build from keyword arguments (API / CLI / JSON), rejecting unknown keys."""
        valid = cls.field_names()
        unknown = sorted(set(kw) - set(valid))
        if unknown:
            raise ConfigError(f"unknown sampling parameter(s) {', '.join(unknown)}; "
                              f"valid ones are: {', '.join(valid)}")
        return cls(**kw)


# Temperatures below this are greedy: dividing logits by a tinier number would overflow float32.
GREEDY_TEMPERATURE = 1e-5
