"""tests/benchmarks/bench_wan_step.py --tiny on the CPU: the script runs the real code path (diffusers Wan class,
WanNet, Distiller step, 14B block mode and projection) and writes its tables and JSON with finite numbers.

A test of the script working and of its FLOP bookkeeping (which is exact arithmetic), never of timings.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two CPU runs of the script, about 20 s on an idle 2-core machine

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "benchmarks" / "bench_wan_step.py"
PHASES = ("forward", "jvp", "fwd_bwd")


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, str(SCRIPT), "--tiny", *argv]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _finite_timing(rec: dict) -> None:
    assert not rec.get("oom"), rec
    for key in ("ms", "peak_gib", "model_tflop", "tflops", "mfu"):
        assert math.isfinite(rec[key]) and rec[key] > 0, (key, rec)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("wan_bench")
    # math-jvp: the JVP's self-attention goes through the script's dispatch (on a CPU all attention is math);
    # bf16 FSDP mixed precision with the float32 time path and bf16 autocast, the GPU's defaults
    step = _run("--out", str(out), "--attention", "math-jvp", "--activation-checkpoint", "selective", "--steps", "1",
                "--mixed-precision", "bfloat16", "--autocast", "on", "--peak-tflops-cpu")  # fmt: skip
    assert step.returncode == 0, step.stdout[-3000:] + step.stderr[-3000:]
    block = _run("--out", str(out), "--block-only", "--mixed-precision", "bfloat16", "--autocast", "on",
                 "--passes-from", str(out / "wan_step.json"))  # fmt: skip
    assert block.returncode == 0, block.stdout[-3000:] + block.stderr[-3000:]
    return out


def test_step_table_and_json_have_finite_numbers(runs):
    result = json.loads((runs / "wan_step.json").read_text())
    md = (runs / "wan_step.md").read_text()
    assert result["device"] == "cpu" and "F = Lin_x + Lin_c + A_s + A_c" in result["flop_formula"]
    assert {(r["mixed_precision"], r["autocast"]) for r in result["rows"]} == {("bfloat16", True)}
    assert [(r["attention"], r["activation_checkpointing"]) for r in result["rows"]] == [("math-jvp", "selective")]
    for row in result["rows"]:
        for phase in (*PHASES, "step"):
            _finite_timing(row[phase])
        assert f"| Wan2.1 tiny | {row['attention']} | selective | 48 | {row['forward']['ms']:.1f} ms" in md
    assert "Model FLOPs:" in md


def test_flop_formula_matches_the_flop_counter(runs):
    """The analytic per-row FLOPs equal what torch.utils.flop_counter sees in one forward and one JVP of the tiny
    WanNet (math attention on the CPU, so the attention matmuls are visible too), and the step's model FLOPs are
    the counted passes: 10 row-forwards (one of them the JVP's primal), 1 JVP tangent, 3 backwards."""
    for row in json.loads((runs / "wan_step.json").read_text())["rows"]:
        assert row["flopcounter_linear_over_analytic"] == pytest.approx(1.0, abs=1e-12)
        assert row["flopcounter_attention_over_analytic"] == pytest.approx(1.0, abs=1e-12)
        assert row["flopcounter_jvp_linear_over_analytic"] == pytest.approx(1.0, abs=1e-12)  # one-GEMM Linear rule
        assert row["flopcounter_jvp_attention_over_executed"] == pytest.approx(1.0, abs=1e-12)
        passes = row["step_passes"]
        assert sum(p["rows"] for p in passes) == 10
        assert sum(p["rows"] for p in passes if p["jvp"]) == 1
        assert [p["net"] for p in passes if p["grad"]] == ["fake", "student", "student"]
        f = row["flops_per_row"]
        expected = 10 * f["forward"] + (f["jvp"] - f["forward"]) + 3 * f["backward"]
        assert row["step_flops"] == pytest.approx(expected, rel=1e-12)
        assert row["step"]["model_tflop"] == pytest.approx(expected / 1e12, rel=1e-12)


def test_block_mode_and_projection(runs):
    result = json.loads((runs / "wan_block.json").read_text())
    block = result["block"]
    assert block["config"] == "tiny" and block["cp_degree"] == 2
    rank = block["settings"]["cp2_rank"]
    # one rank: half the tokens for the token-wise work, self-attention over all 48 tokens for half the heads
    assert (rank["tokens_rank"], rank["self_attention_tokens"], rank["self_attention_heads"]) == (24, 48, 1)
    for setting in block["settings"].values():
        for rec in setting["depths"].values():
            for phase in PHASES:
                assert not rec[phase].get("oom") and math.isfinite(rec[phase]["ms"]) and rec[phase]["ms"] > 0
        for phase in PHASES:
            assert math.isfinite(setting["block_ms"][phase]) and math.isfinite(setting["rest_ms"][phase])
    proj = result["projection"]
    assert proj["row_passes"] == {"forward": 9, "jvp": 1, "backward": 3}
    assert proj["a2a_bytes_per_call"] == 48 / 2 * 32 * 2 * (1 / 2)  # (L / cp) x D bf16, (cp - 1) / cp sent
    # the run used the default full checkpointing: a backward's recompute repeats the forward's 4 all-to-alls
    assert block["activation_checkpointing"] == "full"
    assert proj["a2a_calls"] == 2 * (4 * 9 + 8 * 1 + 8 * 3)
    for key in ("compute_s", "a2a_s", "step_s", "fsdp_allgather_s_if_not_overlapped", "params"):
        assert math.isfinite(proj[key]), key
    assert proj["step_s"] == pytest.approx(proj["compute_s"] + proj["a2a_s"], rel=1e-12)
    assert "| cp2_rank: one block |" in (runs / "wan_block.md").read_text()


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_wan_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_net_and_inputs(bench):
    import torch

    from rcm_core.models.flow import FlowModel

    net = bench.build_wan_net(bench.WAN_CONFIGS["tiny"], torch.device("cpu"), "math")
    task = bench.RandomLatentTask(latent=bench.TINY_LATENT, text_len=bench.TINY_TEXT, text_dim=32, device="cpu")
    return net, bench.phase_fns(FlowModel(net, "rf"), task, torch.device("cpu"))


def test_math_jvp_mode_routes_only_the_jvp_to_math_attention():
    bench = _script()
    net, fns = _tiny_net_and_inputs(bench)
    calls = []
    for sa in net.self_attentions():
        core = sa.core_attention
        sa.core_attention = lambda q, k, v, m=None, _core=core: calls.append(q.shape) or _core(q, k, v, m)
    bench.math_attention_in_jvp(net)
    fns["jvp"]()
    assert calls == []  # the JVP's self-attention went to attention_math, not to the net's core
    fns["forward"]()
    fns["fwd_bwd"]()
    assert len(calls) == 2 * len(net.blocks)


def test_ulysses_emulation_gives_one_rank_its_heads_over_all_tokens():
    bench = _script()
    net, fns = _tiny_net_and_inputs(bench)
    shapes = []
    for sa in net.self_attentions():
        core = sa.core_attention
        sa.core_attention = lambda q, k, v, m=None, _core=core: shapes.append(tuple(q.shape)) or _core(q, k, v, m)
    bench.emulate_ulysses(net, 2)
    out = fns["forward"]()
    assert out.shape == (1, *bench.TINY_LATENT)
    tokens = bench.tokens_of(bench.WAN_CONFIGS["tiny"], bench.TINY_LATENT)
    assert set(shapes) == {(1, 1, 2 * tokens, 16)}  # 2 heads / cp 2, all tokens of a rank holding L / 2 x 2


def test_two_ranks_with_context_parallel_build_shards_on_meta(tmp_path):
    """Under torchrun (gloo, 2 CPU ranks, CP=2) the nets are built on meta and each rank materialises its shards:
    the path of the 14B-on-8-GPUs command."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(SCRIPT), "--tiny", "--cp-degree", "2", "--out", str(tmp_path),
           "--phases", "step", "--steps", "1", "--peak-tflops-cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "wan_step.json").read_text())["rows"]
    assert (row["world_size"], row["cp_degree"]) == (2, 2)
    _finite_timing(row["step"])
    # the model FLOPs are the whole step's, split over the ranks for the per-GPU rate
    assert row["step"]["model_tflop"] == pytest.approx(row["step_flops"] / 2 / 1e12, rel=1e-12)


# the message torch's CUDA caching allocator raises (torch 2.x wording)
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 24.00 GiB. GPU 0 has a total capacity of 139.81 GiB of which 3.12 GiB "
    "is free. Including non-PyTorch memory, this process has 136.68 GiB memory in use. Of the allocated memory "
    "118.50 GiB is allocated by PyTorch, and 8.20 GiB is reserved by PyTorch but unallocated."
)


def test_an_out_of_memory_phase_is_recorded_not_raised():
    import torch

    bench = _script()

    def jvp():
        raise torch.OutOfMemoryError(CUDA_OOM)

    rec = bench.run_phase("jvp", jvp, torch.device("cpu"), reps=1, warmup=1, model_flops=1e12, peak=None)
    assert rec["oom"] and (rec["tried_gib"], rec["allocated_gib"], rec["capacity_gib"]) == (24.0, 118.5, 139.81)
    assert bench.oom_text(rec) == "OOM at 118.5 GiB, asking 24.0 GiB more"
    row = {"model": "1.3B", "attention": "math-jvp", "activation_checkpointing": "full", "tokens": 32760,
           "forward": {"ms": 500.0, "mfu": 0.5}, "jvp": rec, "step": rec}  # fmt: skip
    assert "| math-jvp | full | 32760 | 500.0 ms, 50.0% MFU | OOM at 118.5 GiB, asking 24.0 GiB more |" in (
        bench.step_table([row])
    )
