"""Tangent-carrying collectives, Ulysses attention and the parallelized DiT on 2 gloo ranks.

Tangents are compared with the single-device function's and with finite differences: PyTorch's functional
collectives return zero tangents without an error, which only such a comparison catches.
"""

from tests.distributed import workers
from tests.distributed.harness import spawn


def test_collectives_attention_and_dit_carry_values_gradients_and_tangents():
    spawn(workers.check_all, 2, timeout=180)
