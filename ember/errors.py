"""Exceptions with messages meant for the user. The CLI prints them without a traceback."""


class EmberError(Exception):
    """Base class: anything ember raises on purpose, with a message that says what to do."""


class ConfigError(EmberError):
    """A config.json / GGUF metadata / option that is missing, wrong or unsupported."""


class WeightsError(EmberError):
    """Weight files that are missing, truncated, corrupt, or do not match the model (names, shapes)."""


class UnsupportedArchitectureError(ConfigError):
    """The model's architecture is not one ember implements."""


class OutOfMemoryError(EmberError):
    """The model (weights + KV cache) cannot fit in the memory available."""


class PromptTooLongError(EmberError):
    """The prompt plus the tokens to generate do not fit in the context."""
