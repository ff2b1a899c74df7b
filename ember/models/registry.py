"""HF `architectures` name -> ember model class."""
from __future__ import annotations

from ember.errors import UnsupportedArchitectureError
from ember.models.llama import LlamaForCausalLM

MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


def model_class(architecture: str):
    try:
        return MODELS[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(MODELS))}"
        ) from None
