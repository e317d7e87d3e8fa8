"""The whole rCM step (student, EMA, teacher, fake score, sCM JVP, DMD) on N gloo ranks equals the 1-rank step.

Each case runs NUM_STEPS steps of the FSDP2 + context-parallel Distiller in float64 and compares, step by step,
the metrics and the student's and fake score's gradients, and at the end every weight (student, fake, EMA),
with the plain single-process Distiller. Then a fresh Distiller resumes from the checkpoint written before the
last step and must reproduce that step exactly.

Tolerance: relative 1e-10 (absolute 1e-12). Sharding changes only the order of floating-point sums (per-rank
GEMMs over fewer rows or tokens, then a reduce-scatter adding the partial gradients); in float64 that is
~1e-16 relative per operation, and the steps measured here differ by < 1e-14. A real fault (a wrong shard,
a dropped tangent, averaged instead of summed gradients) is off by O(1). Resume: bit-exact.
"""

import math

import pytest
import torch

from rcm_core.parallel.parallel_dims import ParallelConfig
from tests.distributed import rcm_setup, workers
from tests.distributed.harness import spawn

RTOL, ATOL = 1e-10, 1e-12


@pytest.fixture(scope="module")
def reference():
    return rcm_setup.reference_run(torch.float64)


@pytest.mark.parametrize(
    ("dp", "cp", "checkpointing"),
    [
        pytest.param(2, 1, "full", id="fsdp2-full_ac"),
        pytest.param(1, 2, "selective", id="cp2-selective_ac"),
        pytest.param(2, 2, "none", id="fsdp2xcp2"),
    ],
)
def test_rcm_step_on_n_ranks_equals_one_rank_and_resumes_exactly(reference, tmp_path, dp, cp, checkpointing):
    out = tmp_path / "result.pt"
    spawn(workers.run_rcm_steps, dp * cp, dp, cp, checkpointing, str(out), str(tmp_path / "ckpt"), timeout=240)
    got = torch.load(out)
    rcm_setup.assert_same_run(got, reference, rtol=RTOL, atol=ATOL)
    rcm_setup.assert_resumes_exactly(got)


def test_parallel_config_defaults_are_single_device_exact():
    assert ParallelConfig().mixed_precision == "none" and ParallelConfig().activation_checkpointing == "none"


def test_bf16_mixed_precision_keeps_the_time_path_float32(tmp_path):
    """CP=2 with bf16 FSDP mixed precision: blocks compute in bf16, time embedding and adaLN in float32; full and
    selective checkpointing recompute the same values (bit-exact); the loss stays close to the float32 one-rank
    loss. (Selective checkpointing used to be refused under bf16: the adaLN linears' FSDP units sat inside the
    checkpointed block.)"""
    out = tmp_path / "result.pt"
    spawn(workers.run_mixed_precision, 2, str(out), timeout=180)
    got = torch.load(out)
    ref = rcm_setup.reference_run(torch.float32)
    for checkpointing in ("none", "full", "selective"):
        dtypes = got[checkpointing]["dtypes"]
        assert dtypes == {"time_embed": torch.float32, "ada": torch.float32, "mlp": torch.bfloat16}, checkpointing
    for checkpointing in ("full", "selective"):
        for plain, recomputed in zip(got["none"]["steps"], got[checkpointing]["steps"], strict=True):
            assert plain["metrics"] == recomputed["metrics"], checkpointing
            for name, grad in plain["student_grads"].items():
                assert torch.equal(recomputed["student_grads"][name], grad), (checkpointing, name)
    for step, ref_step in zip(got["none"]["steps"], ref["steps"], strict=False):
        # bf16 rounding (8 bits of mantissa) in every block: about 1e-3 relative on this tiny model
        assert math.isclose(step["metrics"]["loss"], ref_step["metrics"]["loss"], rel_tol=2e-2)
