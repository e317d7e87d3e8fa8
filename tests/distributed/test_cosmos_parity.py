"""The rCM step with a tiny Cosmos-Predict2 teacher on N gloo ranks (FSDP2, Ulysses CP over the video tokens with
the RoPE tables sliced, activation checkpointing) equals the 1-rank step; a resumed run repeats the last step.

Every term of the step runs through `CosmosNet`: the student's sCM JVP (tangents through the all-to-alls and the
token gather), the CFG teacher with a negative-prompt embedding, DMD rollouts, the fake-score update. float64,
NUM_STEPS steps, compared step by step (metrics, student and fake-score gradients) and at the end (student, fake,
EMA weights). Tolerance: relative 1e-8 (the issue's), absolute 1e-10; sharding changes only the order of sums, and
the measured worst relative difference is 4.5e-15 (2026-12-05, CPU). A real fault (a wrong RoPE slice, a dropped
tangent) is off by O(1).
"""

import math

import pytest
import torch

from tests.distributed import cosmos_setup, rcm_setup
from tests.distributed.harness import spawn

RTOL, ATOL = 1e-8, 1e-10


@pytest.fixture(scope="module")
def reference():
    return cosmos_setup.reference_run(torch.float64)


@pytest.mark.parametrize(
    ("dp", "cp", "checkpointing"),
    [
        pytest.param(2, 1, "full", id="fsdp2-full_ac"),
        pytest.param(1, 2, "selective", id="cp2-selective_ac"),
        pytest.param(2, 2, "none", id="fsdp2xcp2"),
    ],
)
def test_cosmos_rcm_step_on_n_ranks_equals_one_rank(reference, tmp_path, dp, cp, checkpointing):
    out = tmp_path / "result.pt"
    spawn(
        cosmos_setup.run_cosmos_rcm_steps, dp * cp, dp, cp, checkpointing, str(out), str(tmp_path / "ckpt"), timeout=300
    )
    got = torch.load(out)
    worst = rcm_setup.max_rel_difference(got, reference)
    print(f"cosmos dp={dp} cp={cp} ac={checkpointing}: max rel difference {worst:.2e}")
    rcm_setup.assert_same_run(got, reference, rtol=RTOL, atol=ATOL)
    # resume: the last step again, from the checkpoint written before it, in a fresh Distiller: bit-exact
    rcm_setup.assert_resumes_exactly(got)


def test_cosmos_bf16_mixed_precision_keeps_the_time_path_float32(tmp_path):
    """CP=2 with bf16 FSDP mixed precision: blocks compute in bf16, the time embedding and every adaLN modulation in
    float32; full and selective checkpointing recompute the same values (bit-exact); the loss stays close to the
    float32 one-rank loss."""
    out = tmp_path / "result.pt"
    spawn(cosmos_setup.run_cosmos_mixed_precision, 2, str(out), timeout=300)
    got = torch.load(out)
    ref = cosmos_setup.reference_run(torch.float32)
    for checkpointing in ("none", "full", "selective"):
        dtypes = got[checkpointing]["dtypes"]
        assert dtypes == {"time_embed": torch.float32, "modulation": torch.float32, "ff": torch.bfloat16}, checkpointing
    for checkpointing in ("full", "selective"):
        for plain, recomputed in zip(got["none"]["steps"], got[checkpointing]["steps"], strict=True):
            assert plain["metrics"] == recomputed["metrics"], checkpointing
            for name, grad in plain["student_grads"].items():
                assert torch.equal(recomputed["student_grads"][name], grad), (checkpointing, name)
    for step, ref_step in zip(got["none"]["steps"], ref["steps"], strict=False):
        # bf16 rounding (8 bits of mantissa) in every block: measured 1.7e-3 and 3.8e-3 relative on this tiny model
        assert math.isclose(step["metrics"]["loss"], ref_step["metrics"]["loss"], rel_tol=2e-2)
