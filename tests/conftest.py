"""Test-wide setup.

Triton reads TRITON_INTERPRET when it is first imported, so it is set here, before any test
module imports triton: on a machine without CUDA the Triton kernels run in the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
