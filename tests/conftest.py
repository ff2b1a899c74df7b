"""Test-session set-up. Without CUDA, Triton kernels run through Triton's interpreter: Triton fixes
interpreter-or-GPU when a kernel is decorated, so TRITON_INTERPRET must be set before anything imports
triton. It does not change which path ember takes: ops send CPU tensors to the (interpreted) Triton kernels
only while EMBER_TRITON_CPU=1, which the kernel test modules set for their own tests."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
