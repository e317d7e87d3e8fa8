"""Functions that run inside the spawned ranks (importable by name, as start method spawn requires).

Assertions inside a worker fail the test with the rank's traceback; parity results go to a file for the parent.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as dist

from rcm_core.checkpoint import load_checkpoint, save_checkpoint
from rcm_core.distill import Distiller
from rcm_core.models.attention import attention_math
from rcm_core.models.flow import FlowModel
from rcm_core.parallel.collectives import all_gather, all_to_all
from rcm_core.parallel.context_parallel import UlyssesAttention
from rcm_core.parallel.parallel_dims import ParallelConfig, ParallelDims
from rcm_core.parallel.parallelize import build_parallel_dit, net_copier
from tests.distributed import rcm_setup

FD_STEP = 1e-6  # central differences in float64: truncation ~1e-12, rounding ~1e-10
FD_TOL = {"rtol": 1e-6, "atol": 1e-7}
EXACT_TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64, only summation order differs


def _central_difference(fn, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (fn(x + FD_STEP * v) - fn(x - FD_STEP * v)) / (2 * FD_STEP)


def _same_on_all_ranks(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _parallel_dims(world: int, dp: int, cp: int, device_type: str = "cpu") -> ParallelDims:
    dims = ParallelDims(dp_shard_degree=dp, cp_degree=cp, world_size=world)
    dims.build_mesh(device_type)
    return dims


# --------------------------------------------------------------------------------------------------- collectives


def check_collectives(rank: int, world: int) -> None:
    """all_to_all and all_gather: values, gradients (vs the single-device function) and tangents (vs FD)."""
    x, v, w = (_same_on_all_ranks(2, 4, 6, 3, seed=s) for s in (1, 2, 3))  # (B, H, L, D), full
    seq = lambda t: t.chunk(world, dim=2)[rank]  # noqa: E731  this rank's sequence shard
    heads = lambda t: t.chunk(world, dim=1)[rank]  # noqa: E731  this rank's head shard

    # all_to_all, (B, H, L/W, D) -> (B, H/W, L, D)
    fn = lambda a: all_to_all(a, scatter_dim=1, gather_dim=2).sin()  # noqa: E731
    torch.testing.assert_close(all_to_all(seq(x), 1, 2), heads(x), rtol=0, atol=0)
    out, tangent = torch.func.jvp(fn, (seq(x),), (seq(v),))
    torch.testing.assert_close(tangent, heads(x.cos() * v), **EXACT_TOL)
    torch.testing.assert_close(tangent, _central_difference(fn, seq(x), seq(v)), **FD_TOL)
    assert tangent.abs().max() > 0.1  # the failure mode of functional collectives is a zero tangent
    xl = seq(x).requires_grad_()
    (fn(xl) * heads(w)).sum().backward()  # summed over ranks: (sin(x) * w).sum() of the full tensors
    torch.testing.assert_close(xl.grad, seq(x.cos() * w), **EXACT_TOL)

    # all_gather along the sequence; every rank then computes the same function of the result
    fn = lambda a: all_gather(a, dim=2).sin()  # noqa: E731
    torch.testing.assert_close(all_gather(seq(x), 2), x, rtol=0, atol=0)
    out, tangent = torch.func.jvp(fn, (seq(x),), (seq(v),))
    torch.testing.assert_close(tangent, x.cos() * v, **EXACT_TOL)
    torch.testing.assert_close(tangent, _central_difference(fn, seq(x), seq(v)), **FD_TOL)
    xl = seq(x).requires_grad_()
    (fn(xl) * w).sum().backward()
    torch.testing.assert_close(xl.grad, seq(x.cos() * w), **EXACT_TOL)


def check_ulysses_attention(rank: int, world: int) -> None:
    """Ulysses over sequence shards equals attention over the full sequence: output, tangent, gradients."""
    q, k, v, qt, kt, vt, w = (_same_on_all_ranks(2, 4, 6, 8, seed=s) for s in range(10, 17))
    seq = lambda t: t.chunk(world, dim=2)[rank]  # noqa: E731
    ulysses = UlyssesAttention(attention_math, dist.group.WORLD)

    out, tangent = torch.func.jvp(ulysses, (seq(q), seq(k), seq(v)), (seq(qt), seq(kt), seq(vt)))
    ref_out, ref_tangent = torch.func.jvp(attention_math, (q, k, v), (qt, kt, vt))
    torch.testing.assert_close(out, seq(ref_out), **EXACT_TOL)
    torch.testing.assert_close(tangent, seq(ref_tangent), **EXACT_TOL)
    fd = _central_difference(lambda s: ulysses(*(seq(a + s * b) for a, b in ((q, qt), (k, kt), (v, vt)))), 0.0, 1.0)
    torch.testing.assert_close(tangent, fd, **FD_TOL)

    local = [seq(t).requires_grad_() for t in (q, k, v)]
    (ulysses(*local) * seq(w)).sum().backward()
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    (attention_math(*full) * w).sum().backward()
    for got, ref in zip(local, full, strict=True):
        torch.testing.assert_close(got.grad, seq(ref.grad), **EXACT_TOL)


def check_parallel_dit(rank: int, world: int) -> None:
    """The parallelized DiT (FSDP2 root forward, batch or context parallel) matches the plain DiT, and its JVP
    (torch.func.jvp through the root module and the collectives) matches the plain DiT's and finite differences."""
    torch.set_default_dtype(torch.float64)
    teacher = rcm_setup.teacher_net()
    cfg = teacher.cfg
    b = 2 * world
    x, x_t = (_same_on_all_ranks(b, cfg.in_channels, cfg.image_size, cfg.image_size, seed=s) for s in (20, 21))
    t = torch.rand(b, generator=torch.Generator().manual_seed(22), dtype=torch.float64) + 0.1
    cond = {"tokens": _same_on_all_ranks(b, rcm_setup.COND_LEN, cfg.cond_dim, seed=23)}
    inputs = (x, t, cond, x_t)
    reference = _flow_jvps(FlowModel(teacher, "rf"), *inputs)
    for dp, cp in ((world, 1), (1, world)):
        dims = _parallel_dims(world, dp, cp)
        net = build_parallel_dit(
            cfg, parallel_dims=dims, config=ParallelConfig(), device="cpu", state_dict=teacher.state_dict()
        )
        model = FlowModel(net, "rf")  # the Distiller's call path: FlowModel -> root FSDP module
        out, tangent, tangent_x = _flow_jvps(model, *inputs)
        torch.testing.assert_close(out, reference[0], **EXACT_TOL)
        torch.testing.assert_close(tangent, reference[1], **EXACT_TOL)
        # finite differences in x only: the time embedding rounds t to float32, finer than FD_STEP can see
        with torch.no_grad():
            fd = _central_difference(functools.partial(model, t=t, cond=cond), x, x_t)
        torch.testing.assert_close(tangent_x, fd, **FD_TOL)
        assert tangent_x.abs().max() > 0.1
        if dp > 1:
            try:
                model(x[:3], t[:3], {"tokens": cond["tokens"][:3]})
            except ValueError as exc:
                assert "batch size 3 is not divisible by dp_shard_degree" in str(exc)
            else:
                raise AssertionError("an indivisible batch must raise")


@torch.no_grad()  # as in sCM
def _flow_jvps(model, x, t, cond, x_t):
    """F, its JVP along (x_t, dt = 1) as sCM takes it, and its JVP along x_t alone."""
    out, tangent = torch.func.jvp(lambda a, tt: model(a, tt, cond), (x, t), (x_t, torch.ones_like(t)))
    _, tangent_x = torch.func.jvp(lambda a: model(a, t, cond), (x,), (x_t,))
    return out, tangent, tangent_x


def check_all(rank: int, world: int) -> None:
    check_collectives(rank, world)
    check_ulysses_attention(rank, world)
    check_parallel_dit(rank, world)


# --------------------------------------------------------------------------------------------------- rCM parity


def _parallel_distiller(world: int, dp: int, cp: int, config: ParallelConfig, device: str) -> Distiller:
    dims = _parallel_dims(world, dp, cp, torch.device(device).type)
    copy_net = net_copier(parallel_dims=dims, config=config, device=device)
    return Distiller(
        rcm_setup.distill_config(),
        rcm_setup.teacher_net(),
        rcm_setup.image_task(device),
        parameterization="rf",
        copy_net=copy_net,
        device=device,
    )


def run_rcm_steps(
    rank: int, world: int, dp: int, cp: int, ac: str, out_path: str, ckpt_root: str, dtype_name: str = "float64"
) -> None:
    """NUM_STEPS rCM steps on dp x cp ranks, with a checkpoint before the last one; then a fresh Distiller resumes
    from it and repeats the last step. Rank 0 writes every step's metrics and gradients and the final weights."""
    device = f"cuda:{rank}" if dist.get_backend() == "nccl" else "cpu"
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")  # CUDA: warn where no deterministic kernel
    torch.set_default_dtype(getattr(torch, dtype_name))
    config = ParallelConfig(fsdp_degree=dp, cp_degree=cp, activation_checkpointing=ac)
    d = _parallel_distiller(world, dp, cp, config, device)
    steps, path = [], None
    for i in range(rcm_setup.NUM_STEPS):
        if i == rcm_setup.NUM_STEPS - 1:
            path = save_checkpoint(d, Path(ckpt_root), d.step)
        steps.append(rcm_setup.record_step(d))
    result = {"steps": steps, "final": rcm_setup.final_state(d)}

    resumed = _parallel_distiller(world, dp, cp, config, device)
    load_checkpoint(resumed, path)
    result["resumed_step"] = rcm_setup.record_step(resumed)
    result["resumed_final"] = rcm_setup.final_state(resumed)
    if rank == 0:
        torch.save(result, out_path)


def run_mixed_precision(rank: int, world: int, out_path: str) -> None:
    """bf16 FSDP mixed precision with context parallelism, without checkpointing, with full and with selective
    checkpointing: the dtypes on the time path and in the blocks, and two steps' metrics and student gradients."""
    torch.use_deterministic_algorithms(True)
    result = {}
    for checkpointing in ("none", "full", "selective"):
        config = ParallelConfig(cp_degree=world, activation_checkpointing=checkpointing, mixed_precision="bfloat16")
        d = _parallel_distiller(world, 1, world, config, "cpu")
        dtypes: dict[str, torch.dtype] = {}
        net = d.student.net
        for name, module in (("time_embed", net.time_embed), ("ada", net.blocks[0].ada), ("mlp", net.blocks[0].mlp)):
            module.register_forward_hook(functools.partial(_record_dtype, dtypes, name))
        steps = [rcm_setup.record_step(d) for _ in range(2)]
        result[checkpointing] = {"steps": steps, "dtypes": dtypes}
    if rank == 0:
        torch.save(result, out_path)


def _record_dtype(dtypes: dict, name: str, module, args, output) -> None:
    dtypes.setdefault(name, output.dtype)
