"""The `device` fixture of the kernel tests (tests/kernels/common.py)."""
from tests.kernels.common import device  # noqa: F401
