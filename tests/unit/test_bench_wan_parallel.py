"""tests/benchmarks/bench_wan_parallel.py's bookkeeping, without running a step: the profile summary (collective
kinds, overlap with compute), the table over configurations (max over ranks, OOM as a result, runs cut short,
the one-GPU projection row), the mesh and batch a CP degree gives, and the step's pass counter seeing the global
batch under data parallelism. Exact arithmetic on hand-made inputs; the script itself runs in the CPU check of
`docs/perf/pending_gpu_run_wan.sh 14b-8gpu` (docs/benchmarks.md).
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PROJECTION = ROOT / "docs" / "perf" / "wan_2026-12-05_h200" / "wan_block_14b.json"


def _script():
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_wan_parallel", ROOT / "tests/benchmarks/bench_wan_parallel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_and_op_names_are_classified_by_collective_kind():
    bench = _script()
    gpu = {
        "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)": "all_to_all",
        "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "all_gather",
        "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "reduce_scatter",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "all_reduce",
        "ncclDevKernel_Broadcast_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "other_collective",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "compute",
        "_attn_jvp_fwd_kernel": "compute",
        "Memcpy DtoD (Device -> Device)": "compute",
    }
    for name, kind in gpu.items():
        assert bench.classify(name, on_device=True) == kind, name
    cpu = {"gloo:all_to_all": "all_to_all", "gloo:all_gather": "all_gather", "aten::mm": "compute",
           "c10d::alltoall_base_": None, "FSDP::all_gather": None}  # fmt: skip
    for name, kind in cpu.items():
        assert bench.classify(name, on_device=False) == kind, name


def test_profile_summary_separates_overlapped_from_exposed_collective_time():
    bench = _script()
    events = [("compute", 0, 10e3), ("compute", 20e3, 30e3), ("compute", 22e3, 24e3),  # nested: counted once
              ("all_to_all", 5e3, 15e3), ("all_gather", 25e3, 26e3), ("reduce_scatter", 40e3, 45e3),
              ("all_to_all", 8e3, 9e3)]  # fmt: skip  # (kind, start us, end us)
    s = bench.summarize_events(events)
    assert s["window_ms"] == 45
    assert s["compute_ms"] == 20  # union of [0, 10] and [20, 30]
    assert s["collective_ms"] == 16  # [5, 15] + [25, 26] + [40, 45]
    assert s["overlap_ms"] == 6  # [5, 10] and [25, 26]
    assert s["exposed_collective_ms"] == 10 and s["overlap_frac"] == pytest.approx(6 / 16)
    assert s["busy_ms"]["all_to_all"] == 11 and s["busy_ms"]["all_gather"] == 1 and s["busy_ms"]["all_reduce"] == 0


def test_cp_degree_sets_the_data_parallel_degree_and_the_global_batch():
    bench = _script()
    assert bench.mesh_and_batch(8, 8, 1) == (1, 1)
    assert bench.mesh_and_batch(8, 4, 1) == (2, 2)  # CP=4 x FSDP=2: one sample per group of 4
    assert bench.mesh_and_batch(4, 2, 1) == (2, 2)
    with pytest.raises(ValueError, match="not divisible by cp_degree"):
        bench.mesh_and_batch(8, 3, 1)


def test_pass_counter_sees_the_global_batch_under_batch_sharding():
    """The batch-sharding pre-hook (registered at parallelize time, before the counter) hands the net its rank's
    rows; the step's FLOPs are the global batch's, so the counter must see the rows before that hook."""
    bench = _script()
    net = torch.nn.Linear(4, 4)
    net.register_forward_pre_hook(lambda module, args: (args[0][:1],))  # keep one of the rows, as on 2 dp ranks
    counter = bench.wan.PassCounter({"student": net})
    counter.enabled = True
    net(torch.zeros(2, 4))
    assert [p["rows"] for p in counter.passes] == [2]


def _rank(label, rank, *, cp=4, dp=2, step=None, peak=None, profile=None, stages=("started", "built"), **extra):
    rec = {"label": label, "rank": rank, "model": "14B", "world_size": cp * dp, "cp_degree": cp, "dp_shard_degree": dp,
           "batch_size": dp, "tokens": 32760, "activation_checkpointing": "full", "device": "NVIDIA H200",
           "date": "2026-12-05", "torch": "2.11.0", "peak_tflops": 989.0, "stages": list(stages),
           "step_flops": 2 * 30.0e15, **extra}  # fmt: skip
    if step is not None:
        rec["step"] = {"s": step, "all_s": [step, step], "peak_gib": peak}
    if profile is not None:
        rec["profile"] = profile
    return rec


def _profile(exposed):
    return {"busy_ms": {"all_to_all": 300.0, "all_gather": 500.0, "reduce_scatter": 200.0, "all_reduce": 1.0,
                        "other_collective": 0.5}, "compute_ms": 20000.0,
            "collective_ms": 900.0, "overlap_ms": 900.0 - exposed, "exposed_collective_ms": exposed,
            "overlap_frac": (900.0 - exposed) / 900.0}  # fmt: skip


def test_table_takes_the_max_over_ranks_and_records_oom_and_runs_cut_short(tmp_path):
    bench = _script()
    oom = {"oom": True, "peak_gib": 120.0, "allocated_gib": 118.5, "tried_gib": 24.0, "message": "CUDA out of memory"}
    recs = [_rank("a_ok", 0, step=20.0, peak=100.0, profile=_profile(100.0)),
            _rank("a_ok", 1, step=21.0, peak=110.5, profile=_profile(250.0))]  # fmt: skip
    recs += [_rank("a_ok", r, step=20.5, peak=90.0) for r in range(2, 8)]
    recs += [_rank("b_oom", 0), _rank("b_oom", 1, step=None, warmup=oom)]
    recs += [_rank("c_cut", 0, stages=("started", "built", "warm-up"))]
    for rec in recs:
        (tmp_path / f"wan_par_{rec['label']}.rank{rec['rank']}.json").write_text(json.dumps(rec))
    for label, code in (("a_ok", 0), ("b_oom", 1), ("c_cut", 124), ("d_none", 124)):
        (tmp_path / f"wan_par_{label}.exit").write_text(f"{code}\n")
    result = bench.build_table(tmp_path, PROJECTION)
    rows = {r["label"]: r for r in result["rows"]}
    ok = rows["a_ok"]
    assert ok["status"] == "ok" and ok["step_s"] == 21.0 and ok["peak_gib"] == 110.5  # slowest rank, largest peak
    assert ok["tokens_per_s_per_gpu"] == pytest.approx(2 * 32760 / 21.0 / 8)
    assert ok["mfu"] == pytest.approx(60.0e15 / 8 / 21.0 / 1e12 / 989.0)
    assert ok["profile_rank"] == 0 and ok["exposed_collective_ms_max_over_ranks"] == 250.0
    assert rows["b_oom"]["status"] == "OOM at 118.5 GiB, asking 24.0 GiB more (warmup, rank 1)"
    assert rows["c_cut"]["status"] == "cut short after 'warm-up' (exit 124)"
    assert rows["d_none"]["status"] == "no result (exit 124)"
    # the one-GPU projection (2026-12-05): 9 row-forwards, 1 JVP, 3 backwards of the 14B net = 30,749 TFLOP
    # (docs/perf/wan.md), 11.11 s on 8 GPUs
    proj = rows["projection"]
    assert proj["step_tflop"] == pytest.approx(30749, rel=1e-4) and proj["step_s"] == pytest.approx(11.111, rel=1e-3)
    assert proj["mfu"] == pytest.approx(30749e12 / 8 / 11.1112 / 989e12, rel=1e-3)
    md = (tmp_path / "wan_parallel.md").read_text()
    assert (
        "| CP=4 x FSDP=2 (8) | full | 2 | ok | 21.00 | 110.5 | 390 | 357.1 | 36.1% | 300 | 500 | 200 | 2 | 20000 | "
        in md
    )
    assert "89% | 100 / 250 |" in md
    assert "projection, CP=8 (8), from one NVIDIA H200 (2026-12-05)" in md
