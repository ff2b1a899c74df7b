"""Texts shipped with ember for offline quantization: calibration texts for `ember convert` and a held-out
text for `ember eval`. Origins and licenses: README.md beside this file."""
from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def default_calibration_files() -> list[Path]:
    """The bundled calibration texts (prose, code, poetry, drama; English, German, Spanish, CJK), sorted
    by name so the concatenation order is stable."""
    return sorted((_HERE / "calibration").glob("*.txt"))


def heldout_text_file() -> Path:
    """English prose that is in no calibration file (Alice's Adventures in Wonderland, ~39k SmolLM2
    tokens): the default evaluation text."""
    return _HERE / "heldout" / "alice_in_wonderland.txt"
