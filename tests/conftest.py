"""Shared fixtures: deterministic torch, two CPU threads (the CI machine has two cores).

TRITON_INTERPRET is set here, before any test module can import rcm_core.kernels: Triton chooses the
interpreter when a `@triton.jit` decorator runs, so setting it later (after some other test imported
the kernels) would leave the kernel tests on a missing GPU driver.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
