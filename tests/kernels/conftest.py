"""Kernel tests run the real Triton source: compiled on a GPU, through Triton's interpreter on a CPU.

TRITON_INTERPRET must be set before any `@triton.jit` decorator executes (Triton picks the interpreter at
decoration time), so it is set here, before the test modules import rcm_core.kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
