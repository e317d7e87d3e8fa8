"""A LoRA student (rcm_core.teachers.lora) of the tiny Wan on 2 gloo ranks equals the 1-rank Distiller: FSDP=2 with
full checkpointing (each block's FSDP unit then holds frozen base weights and trainable adapters together: FSDP2
shards both and reduce-scatters gradients of the adapters alone; the sCM JVP runs through peft's LoRA layers
inside the checkpointed, sharded blocks), and CP=2 (Ulysses) with selective checkpointing.

NUM_STEPS float64 rCM steps (sCM + DMD, the fake score a full network) compared step by step: metrics, the
student's gradients (adapters only, on both sides) and the fake score's, then every final weight of the student,
its EMA and the fake score, at the Wan parity test's tolerance (relative 1e-8, absolute 1e-12); a fresh sharded
Distiller resumed from the sharded checkpoint (adapters only) repeats the last step bit for bit; the worker's
unsharded EMA copy (workers.distributed.full_copy from the LoRA template) holds the reference EMA's weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from rcm_core.checkpoint import load_checkpoint, save_checkpoint
from rcm_core.config import DataConfig, LoraConfig, StudentConfig
from rcm_core.distill import Distiller
from rcm_core.parallel.parallel_dims import ParallelConfig
from rcm_core.parallel.parallelize import net_copier
from rcm_core.teachers.lora import is_adapter
from tests.distributed import rcm_setup
from tests.distributed.harness import spawn
from tests.distributed.test_wan_parity import ATOL, RTOL, video_task, wan_teacher
from tests.distributed.workers import _parallel_dims
from workers import distributed

LORA = LoraConfig(rank=4, alpha=8.0, target_modules=["to_q", "to_v", "attn1.to_out.0", "ffn.net.2"])


def lora_distiller(copy_net=None) -> Distiller:
    config = rcm_setup.distill_config()
    config = dataclasses.replace(
        config,
        task="diffusers",
        data=DataConfig(dataset="teacher-synthetic", latent_shape=[4, 3, 4, 8]),
        student=StudentConfig(lora=LORA),
    )
    config.teacher.guidance_scale = 5.0
    return Distiller(config, wan_teacher(), video_task(), parameterization="rf", copy_net=copy_net)


def run_lora_steps(rank: int, world: int, dp: int, cp: int, ac: str, out_path: str, ckpt_root: str) -> None:
    """NUM_STEPS steps on `world` FSDP ranks, a sharded checkpoint before the last, and a fresh Distiller resumed
    from it repeating the last step; rank 0 writes the record."""
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float64)
    config = ParallelConfig(fsdp_degree=dp, cp_degree=cp, activation_checkpointing=ac)

    def build():
        return lora_distiller(net_copier(parallel_dims=_parallel_dims(world, dp, cp), config=config, device="cpu"))

    d = build()
    steps = []
    for i in range(rcm_setup.NUM_STEPS):
        if i == rcm_setup.NUM_STEPS - 1:
            path = save_checkpoint(d, Path(ckpt_root), d.step)
        steps.append(rcm_setup.record_step(d))
    result = {"steps": steps, "final": rcm_setup.final_state(d)}
    # the worker's unsharded EMA student for rank 0's evaluation and export, built from the LoRA template
    gathered = distributed.full_copy(d.ema.model.net, d.student_template)
    if rank == 0:
        result["gathered_ema"] = {f"net.{k}": v.clone() for k, v in gathered.state_dict().items()}
    resumed = build()
    load_checkpoint(resumed, path)
    result["resumed_step"] = rcm_setup.record_step(resumed)
    result["resumed_final"] = rcm_setup.final_state(resumed)
    if rank == 0:
        torch.save(result, out_path)


@pytest.fixture(scope="module")
def reference():
    with rcm_setup.default_dtype(torch.float64):
        d = lora_distiller()
        run = {"steps": [rcm_setup.record_step(d) for _ in range(rcm_setup.NUM_STEPS)]}
        run["final"] = rcm_setup.final_state(d)
    return run


def test_reference_trains_the_adapters_alone(reference):
    """Guards the parity test against a vacuous pass: adapters alone get non-zero gradients, every base weight
    stays the teacher's."""
    with rcm_setup.default_dtype(torch.float64):
        teacher = {f"net.{k}": v for k, v in wan_teacher().state_dict().items()}
    grads = reference["steps"][-1]["student_grads"]
    assert grads and all(is_adapter(n) and g.norm() > 0 for n, g in grads.items())
    for name, value in reference["final"]["student"].items():
        if not is_adapter(name):
            assert torch.equal(value, teacher[name.replace(".base_layer.", ".")]), name


@pytest.mark.parametrize(
    ("dp", "cp", "checkpointing"),
    [pytest.param(2, 1, "full", id="fsdp2-full_ac"), pytest.param(1, 2, "selective", id="cp2-selective_ac")],
)
def test_lora_student_on_two_ranks_equals_one_rank(reference, tmp_path, dp, cp, checkpointing):
    out = tmp_path / "result.pt"
    spawn(run_lora_steps, 2, dp, cp, checkpointing, str(out), str(tmp_path / "ckpt"), timeout=300)
    got = torch.load(out)
    worst = rcm_setup.max_rel_difference(got, reference)
    print(f"LoRA dp={dp} cp={cp} ac={checkpointing}: max relative difference {worst:.2e}")
    rcm_setup.assert_same_run(got, reference, rtol=RTOL, atol=ATOL)
    rcm_setup.assert_resumes_exactly(got)
    ema = reference["final"]["ema"]
    assert got["gathered_ema"].keys() >= ema.keys()
    for name, value in ema.items():
        torch.testing.assert_close(got["gathered_ema"][name], value, rtol=RTOL, atol=ATOL, msg=name)
    # the sharded checkpoint holds the student's and the EMA's adapters, no base weight
    entries = dcp.FileSystemReader(str(next((tmp_path / "ckpt").glob("step-*")))).read_metadata().state_dict_metadata
    for prefix in ("app.student.", "app.ema.model."):
        names = {k.removeprefix(prefix) for k in entries if k.startswith(prefix)}
        assert names and all(is_adapter(n) for n in names), prefix
