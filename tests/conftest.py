"""Shared fixtures: deterministic torch, two CPU threads (the CI machine has two cores)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield
