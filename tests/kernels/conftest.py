"""Kernel tests run the real Triton source: compiled on a GPU, through Triton's interpreter on a CPU.

TRITON_INTERPRET must be set before any `@triton.jit` decorator executes (Triton picks the interpreter at
decoration time), so it is set here, before the test modules (and the fixtures below) import rcm_core.kernels.
"""

import importlib
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# the package re-exports the function `attention_jvp`, which shadows the submodule attribute of the same name
kernel_module = importlib.import_module("rcm_core.kernels.attention_jvp")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel (Triton or Gluon) does not write fails."""

    def new_nan(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernel_module, "_new_output", new_nan)


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh inputs for every case, the same on every run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.Generator(device=device).manual_seed(zlib.crc32(request.node.nodeid.encode()))
