"""The rCM step of the published Wan2.1-T2V-14B transformer on one multi-GPU host (issue 21): one configuration per
torchrun call, and the table over the configurations.

A script, not a test. Under torchrun (one GPU per rank, NCCL; on a CPU: gloo), one configuration = a mesh (CP =
`--cp-degree` ranks per sample, FSDP over all ranks, data parallel over world / cp groups) and an activation
checkpointing policy. Teacher, student, EMA and fake score are the Wan2.1-T2V-14B config with random weights
(`bench_wan_step.WAN_CONFIGS["14B"]`: 40 heads x 128, ffn 13,824, 40 layers; checked 2026-12-05 against the
"Wan-T2V-14B" `diffusers_config` of diffusers' scripts/convert_wan_to_diffusers.py, commit 0122271c, and Wan's own
wan/configs/wan_t2v_14B.py), built on `meta`, each rank materialising only its FSDP shards
(`bench_wan_step.meta_copier`), with bf16 FSDP mixed precision (float32 time path), bf16 autocast around the losses
and the project's fused forward+JVP attention kernel (the Wan net's "auto" backend on CUDA) -- the step the worker
runs (`Distiller.train_step`: critic update, sCM + DMD student update, EMA), as `bench_wan_step.py` builds it.
Shapes: 480p x 81 frames (latent 16 x 21 x 60 x 104 = 32,760 tokens), text 512 x 4096, CFG 5; the global batch is
one sample per data-parallel group (1 at CP=8 on 8 GPUs, 2 at CP=4 x FSDP=2).

Per configuration, every rank writes `wan_par_<label>.rank<r>.json` after each stage (a run cut short, or one rank
out of memory, keeps what it had):
  build     the four nets (an OOM or error here is recorded, the process exits 3);
  warm-up   one step (Triton autotuning), whose network calls are counted by hooks (global rows);
  timed     `--steps` steps: median seconds, this rank's peak `max_memory_allocated` over them;
  profile   one more step under torch.profiler (CUDA kernels on a GPU; CPU ops on a CPU), summarised as time in
            all-to-all / all-gather / reduce-scatter / all-reduce collectives vs the rest (compute, copies) and how
            much of the collectives' time overlaps compute; skipped when `--budget-s` would be exceeded (all ranks
            agree through one all-reduce).
An out-of-memory error is a result ("OOM at N GiB, asking M GiB more"), not a crash: the rank records it and exits 3,
so torchrun ends the other ranks instead of leaving them in a collective.

`--table DIR` merges the rank files (and the `wan_par_<label>.exit` codes the shell script writes) into
`wan_parallel.md` and `wan_parallel.json`:
  step s         the slowest rank's median step time;
  peak GiB       max over ranks;
  tokens/s/GPU   batch x tokens / step s / world size (each sample's tokens counted once per step);
  MFU            model FLOPs of the step / world size / step s / peak (989 TFLOP/s dense bf16, H100/H200 SXM), with
                 the FLOP formula of bench_wan_step.py (recompute not counted; the step's FLOPs are the sum over its
                 counted network calls);
  profile        rank 0's kernel time per collective kind (all-to-all, all-gather, reduce-scatter, all-reduce and
                 other) and compute, the collectives' union, the part of it that
                 overlaps compute, the exposed rest (rank 0, and the max over ranks). NCCL kernel time includes the
                 time a kernel waits for its peers, so it bounds the transfer time from above.
With `--projection` (the one-GPU block JSON of docs/perf/), the projected CP=8 step is a row of its own.

    torchrun --nproc-per-node 8 tests/benchmarks/bench_wan_parallel.py --out R --cp-degree 8 \\
        --activation-checkpoint full --label cp8_full
    python tests/benchmarks/bench_wan_parallel.py --table R \\
        --projection docs/perf/wan_2026-12-05_h200/wan_block_14b.json
The whole matrix in one device call: `bash docs/perf/pending_gpu_run_wan.sh 14b-8gpu`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_wan_step as wan  # noqa: E402

from rcm_core.parallel.parallel_dims import ParallelConfig, ParallelDims  # noqa: E402

# kernel / op names of each collective kind: NCCL kernels (ncclDevKernel_AllGather_RING_LL, ..._SendRecv for
# all_to_all_single, which NCCL runs as grouped sends and receives) and gloo's CPU ops (gloo:all_to_all, ...)
COLLECTIVES = (
    ("all_to_all", re.compile(r"sendrecv|alltoall|all_to_all", re.I)),
    ("all_gather", re.compile(r"allgather|all_gather", re.I)),
    ("reduce_scatter", re.compile(r"reducescatter|reduce_scatter", re.I)),
    ("all_reduce", re.compile(r"allreduce|all_reduce", re.I)),
    ("other_collective", re.compile(r"nccl|gloo", re.I)),
)
KINDS = tuple(k for k, _ in COLLECTIVES)


# ------------------------------------------------------------------------------------------------- profile
def classify(name: str, on_device: bool) -> str | None:
    """The kind of one profiler event: a collective kind, "compute", or None (not counted).

    On a GPU every kernel counts (a collective's NCCL kernel, or compute: GEMMs, attention, copies). On a CPU
    (gloo) the collectives are gloo's work events (`gloo:*`), compute the `aten::` ops; the c10d launch ops and
    record_function scopes, which enclose other ops, are left out.
    """
    if not on_device and not name.startswith(("gloo:", "aten::")):
        return None
    if on_device and "nccl" not in name.lower():
        return "compute"
    if not on_device and name.startswith("aten::"):
        return "compute"
    return next(kind for kind, pattern in COLLECTIVES if pattern.search(name))


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals as sorted, disjoint intervals."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize_events(events: list[tuple[str, float, float]]) -> dict:
    """Milliseconds per kind and overlap, from (kind, start_us, end_us) events (kind from `classify`).

    busy_ms: summed event time per kind; collective_ms / compute_ms: the unions (time in which at least one such
    event ran); overlap_ms: time in which a collective and compute ran together; exposed_collective_ms: collective
    time with no compute alongside.
    """
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for kind, start, end in events:
        by_kind.setdefault(kind, []).append((start, end))
    coll = merge([iv for k in KINDS for iv in by_kind.get(k, [])])
    comp = merge(by_kind.get("compute", []))
    overlap = intersection(coll, comp)
    starts = [s for _, s, _ in events] or [0.0]
    ends = [e for _, _, e in events] or [0.0]
    ms = 1e-3
    return {
        "window_ms": (max(ends) - min(starts)) * ms,
        "busy_ms": {k: sum(b - a for a, b in by_kind.get(k, [])) * ms for k in (*KINDS, "compute")},
        "collective_ms": length(coll) * ms,
        "compute_ms": length(comp) * ms,
        "overlap_ms": overlap * ms,
        "exposed_collective_ms": (length(coll) - overlap) * ms,
        "overlap_frac": overlap / length(coll) if coll else None,
        "events": len(events),
    }


def profile_events(prof, on_device: bool) -> list[tuple[str, float, float]]:
    """(kind, start_us, end_us) of the profiled events, from kineto's flat event list (no op tree is built: a 14B
    step has tens of thousands of kernels)."""
    want = torch.autograd.DeviceType.CUDA if on_device else torch.autograd.DeviceType.CPU
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != want:
            continue
        kind = classify(e.name(), on_device)
        if kind is not None:
            start = e.start_ns() / 1e3
            out.append((kind, start, start + e.duration_ns() / 1e3))
    return out


def profiled_step(step, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    on_device = device.type == "cuda"
    activity = ProfilerActivity.CUDA if on_device else ProfilerActivity.CPU
    wan.sync(device)
    with profile(activities=[activity]) as prof:
        step()
        wan.sync(device)
    return summarize_events(profile_events(prof, on_device))


# ------------------------------------------------------------------------------------------------- one config
def tiny_config() -> dict:
    """The smoke-check net with 4 heads, so that CP = 4 divides them (bench_wan_step's tiny has 2)."""
    return {**wan.WAN_CONFIGS["tiny"], "num_attention_heads": 4}


def mesh_and_batch(world: int, cp_degree: int, samples_per_group: int) -> tuple[int, int]:
    """(data-parallel degree, global batch): the degrees rcm_core.parallel resolves for `cp_degree` on `world` ranks
    (FSDP over all of them, the batch split over world / cp groups), with `samples_per_group` samples per group."""
    dims = ParallelDims.from_config(ParallelConfig(cp_degree=cp_degree), world)
    return dims.dp_shard_degree, dims.dp_shard_degree * samples_per_group


def run_config(args) -> int:
    """One configuration under torchrun; returns the exit code (3: a recorded OOM or error)."""
    started = time.perf_counter()
    device = wan.init_process(args.device or ("cpu" if args.tiny else "cuda"))
    rank, world = dist.get_rank(), dist.get_world_size()
    config = tiny_config() if args.tiny else wan.WAN_CONFIGS[args.model]
    latent, text_len = (wan.TINY_LATENT, wan.TINY_TEXT) if args.tiny else (tuple(args.latent), args.text_len)
    try:
        dp, batch = mesh_and_batch(world, args.cp_degree, args.samples_per_group)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    tokens = wan.tokens_of(config, latent)
    import diffusers

    rec: dict = {
        "label": args.label, "rank": rank, "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "argv": sys.argv[1:],
        "model": "tiny" if args.tiny else args.model, "config": config, "world_size": world,
        "cp_degree": args.cp_degree, "dp_shard_degree": dp, "fsdp_degree": world, "batch_size": batch,
        "tokens": tokens, "latent": list(latent), "text_len": text_len,
        "attention": "fused (Triton)" if device.type == "cuda" else "math (CPU: the net's auto backend)",
        "activation_checkpointing": args.activation_checkpoint, "peak_tflops": args.peak_tflops,
        "stages": [],
    }  # fmt: skip
    out = args.out / f"wan_par_{args.label}.rank{rank}.json"

    def save(stage: str | None = None) -> None:
        if stage:
            rec["stages"].append(stage)
        out.write_text(json.dumps(rec, indent=1) + "\n")

    def fail(stage: str, exc: BaseException) -> int:
        rec[stage] = wan.oom_record(exc, device) if isinstance(exc, torch.OutOfMemoryError) else wan.error_record(exc)
        save(f"{stage} failed")
        print(f"[rank {rank}] {stage}: {rec[stage].get('message') or rec[stage].get('error')}", flush=True)
        return 3

    args.out.mkdir(parents=True, exist_ok=True)
    save("started")
    task = wan.RandomLatentTask(latent=latent, text_len=text_len, text_dim=config["text_dim"], device=device)
    try:
        distiller, _ = wan.build_distiller(
            args, config, device, "fused", args.activation_checkpoint, task, batch_size=batch
        )
    except Exception as exc:  # noqa: BLE001 -- an OOM or error is this configuration's result
        return fail("build", exc)
    save("built")
    per_row = wan.phase_flops(wan.wan_flops(config, tokens, text_len))
    counter = wan.PassCounter({n: wan.inner_net(getattr(distiller, n)) for n in ("teacher", "student", "fake")})
    counter.enabled = True
    try:
        t0 = time.perf_counter()
        distiller.train_step()  # warm-up: Triton autotuning; its network calls are the ones counted
        wan.sync(device)
        rec["warmup_s"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001
        return fail("warmup", exc)
    counter.remove()
    rec["step_passes"] = counter.passes
    rec["step_flops"] = wan.step_flops(counter.passes, per_row)  # the global batch's, all ranks together
    save("warm-up")
    try:
        t = wan.time_fn(distiller.train_step, device, args.steps, 0)
    except Exception as exc:  # noqa: BLE001
        return fail("step", exc)
    rec["step"] = {"s": t["s"], "all_s": t["all_s"], "peak_gib": t["peak_gib"]}
    save("timed")
    # profile one more step if every rank has the time for it (one collective, so all ranks decide alike)
    left = args.budget_s - (time.perf_counter() - started)
    go = torch.tensor([1.0 if left > 1.25 * t["s"] + 8 and not args.no_profile else 0.0], device=device)
    dist.all_reduce(go, op=dist.ReduceOp.MIN)
    if go.item() > 0:
        try:
            rec["profile"] = profiled_step(distiller.train_step, device)
        except Exception as exc:  # noqa: BLE001
            return fail("profile", exc)
        save("profiled")
    else:
        rec["profile"] = {"skipped": f"{left:.0f} s left of --budget-s {args.budget_s:.0f}, step {t['s']:.1f} s"}
        save("profile skipped")
    del distiller
    gc.collect()
    dist.destroy_process_group()
    if rank == 0:
        print(f"== {args.label}: step {t['s']:.3f} s, peak {t['peak_gib']:.2f} GiB (rank 0)", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------- table
def merge_ranks(records: list[dict], exit_code: int | None) -> dict:
    """One configuration's row from its ranks' records (and the torchrun exit code, when known)."""
    r0 = min(records, key=lambda r: r["rank"])
    row = {k: r0[k] for k in ("label", "model", "world_size", "cp_degree", "dp_shard_degree", "batch_size", "tokens",
                              "activation_checkpointing", "device", "date", "torch", "peak_tflops")}  # fmt: skip
    row["ranks_reporting"] = len(records)
    row["exit_code"] = exit_code
    failed = [(r["rank"], stage, r[stage]) for r in records for stage in ("build", "warmup", "step", "profile")
              if stage in r and ("oom" in r[stage] or "error" in r[stage])]  # fmt: skip
    if failed:
        rank, stage, what = failed[0]
        kind = wan.oom_text(what) if what.get("oom") else what["error"][:80]
        row["status"] = f"{kind} ({stage}, rank {rank}{', ...' if len(failed) > 1 else ''})"
    elif all("step" in r for r in records) and len(records) == row["world_size"]:
        row["status"] = "ok"
    else:
        last = r0["stages"][-1] if r0["stages"] else "nothing"
        row["status"] = f"cut short after '{last}' (exit {exit_code})"
    timed = [r for r in records if "step" in r and "s" in r["step"]]
    if timed and row["status"] == "ok":
        step_s = max(r["step"]["s"] for r in timed)  # the slowest rank's median
        per_gpu_flops = r0["step_flops"] / row["world_size"]
        row.update(
            step_s=step_s,
            peak_gib=max(r["step"]["peak_gib"] for r in timed),
            tokens_per_s_per_gpu=row["batch_size"] * row["tokens"] / step_s / row["world_size"],
            tflops_per_gpu=per_gpu_flops / step_s / 1e12,
            step_tflop=r0["step_flops"] / 1e12,
            all_step_s={r["rank"]: r["step"]["all_s"] for r in timed},
        )
        row["mfu"] = row["tflops_per_gpu"] / row["peak_tflops"]
    profiles = {r["rank"]: r["profile"] for r in records if "busy_ms" in r.get("profile", {})}
    if profiles:
        p0 = profiles[min(profiles)]
        row["profile_rank"] = min(profiles)
        row["profile"] = p0
        row["exposed_collective_ms_max_over_ranks"] = max(p["exposed_collective_ms"] for p in profiles.values())
    elif records and "skipped" in r0.get("profile", {}):
        row["profile"] = r0["profile"]
    return row


def projection_row(path: Path) -> dict | None:
    """The one-GPU projection (docs/perf: the 14B block timings with a 1.3B step's pass counts) as a table row."""
    if not path or not path.is_file():
        return None
    block = json.loads(path.read_text())
    proj = block.get("projection", {})
    if "step_s" not in proj:
        return None
    config = wan.WAN_CONFIGS[proj["config"]]
    tokens = wan.tokens_of(config, wan.LATENT_480P_81F)
    per_row = wan.phase_flops(wan.wan_flops(config, tokens, wan.TEXT_LEN))
    n = proj["row_passes"]  # row-forwards without tangent, JVPs (primal + tangent), backwards
    flops = n["forward"] * per_row["forward"] + n["jvp"] * per_row["jvp"] + n["backward"] * per_row["backward"]
    cp, step_s = proj["cp_degree"], proj["step_s"]
    peak = block.get("peak_tflops") or wan.PEAK_TFLOPS
    return {
        "label": "projection", "model": proj["config"], "world_size": cp, "cp_degree": cp, "dp_shard_degree": 1,
        "batch_size": 1, "tokens": tokens, "activation_checkpointing": block["block"]["activation_checkpointing"],
        "device": block.get("device"), "date": block.get("date"), "status": "projected", "step_s": step_s,
        "tokens_per_s_per_gpu": tokens / step_s / cp, "tflops_per_gpu": flops / cp / step_s / 1e12,
        "mfu": flops / cp / step_s / 1e12 / peak, "step_tflop": flops / 1e12, "a2a_s_projected": proj["a2a_s"],
        "source": str(path),
    }  # fmt: skip


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The markdown table of the configurations (module doc for the columns)."""
    lines = [
        "| mesh (world) | AC | batch | status | rCM step s | peak GiB/GPU (max) | tokens/s/GPU | TFLOP/s/GPU | MFU "
        "| all-to-all ms | all-gather ms | reduce-scatter ms | all-reduce + other ms | compute ms "
        "| collectives overlapped | exposed collectives ms (rank 0 / max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mesh = f"CP={r['cp_degree']}" + (f" x FSDP={r['dp_shard_degree']}" if r["dp_shard_degree"] > 1 else "")
        mesh += f" ({r['world_size']})"
        if r["status"] == "projected":
            mesh = f"projection, {mesh}, from one {r['device']} ({r['date']})"
        p = r.get("profile") or {}
        busy = p.get("busy_ms", {})
        # gloo has no reduce-scatter: FSDP's gradients show up as all-reduces on a CPU
        other = busy["all_reduce"] + busy["other_collective"] if busy else None
        overlap = "" if p.get("overlap_frac") is None else f"{p['overlap_frac']:.0%}"
        exposed = ""
        if "exposed_collective_ms" in p:
            exposed = f"{p['exposed_collective_ms']:.0f} / {r['exposed_collective_ms_max_over_ranks']:.0f}"
        elif r["status"] == "projected":
            exposed = f"{r['a2a_s_projected'] * 1e3:.0f} (all-to-all, assumed BW)"
        elif "skipped" in p:
            exposed = "profile skipped (time)"
        lines.append(
            f"| {mesh} | {r['activation_checkpointing']} | {r['batch_size']} | {r['status']} | "
            f"{fmt(r.get('step_s'), '.2f')} | {fmt(r.get('peak_gib'), '.1f')} | "
            f"{fmt(r.get('tokens_per_s_per_gpu'), '.0f')} | {fmt(r.get('tflops_per_gpu'), '.1f')} | "
            f"{fmt(r.get('mfu'), '.1%')} | {fmt(busy.get('all_to_all'), '.0f')} | "
            f"{fmt(busy.get('all_gather'), '.0f')} | "
            f"{fmt(busy.get('reduce_scatter'), '.0f')} | {fmt(other, '.0f')} | {fmt(p.get('compute_ms'), '.0f')} | "
            f"{overlap} | {exposed} |"
        )
    return "\n".join(lines) + "\n"


def build_table(out: Path, projection: Path | None = None) -> dict:
    """Read every `wan_par_<label>.rank<r>.json` (and `.exit`) under `out`; write wan_parallel.md / .json."""
    by_label: dict[str, list[dict]] = {}
    for f in sorted(out.glob("wan_par_*.rank*.json")):
        rec = json.loads(f.read_text())
        by_label.setdefault(rec["label"], []).append(rec)
    labels = sorted({*by_label, *(f.name[len("wan_par_") : -len(".exit")] for f in out.glob("wan_par_*.exit"))})
    rows = []
    for label in labels:
        exit_file = out / f"wan_par_{label}.exit"
        code = int(exit_file.read_text().strip()) if exit_file.is_file() else None
        if label in by_label:
            rows.append(merge_ranks(by_label[label], code))
        else:
            rows.append({"label": label, "status": f"no result (exit {code})", "cp_degree": "?", "world_size": "?",
                         "dp_shard_degree": 1, "batch_size": "", "activation_checkpointing": ""})  # fmt: skip
    proj = projection_row(projection) if projection else None
    if proj:
        rows.append(proj)
    first = next((r for r in rows if r.get("device") and r["status"] != "projected"), {})
    head = f"{first.get('date', '')}, {first.get('world_size', '?')} x {first.get('device', '?')}, torch "
    head += (
        f"{first.get('torch', '?')}, Wan2.1-T2V-{first.get('model', '?')}, {first.get('tokens', '?')} tokens/sample\n\n"
    )
    md = head + table(rows)
    result = {"rows": rows, "flop_formula": wan.__doc__.split("Model FLOPs")[1].split("`--block-only`")[0].strip()}
    (out / "wan_parallel.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "wan_parallel.md").write_text(md)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/wan_parallel"))
    ap.add_argument("--table", type=Path, default=None, help="merge the rank files under this directory, then exit")
    ap.add_argument("--projection", type=Path, default=None, help="with --table: a one-GPU block JSON (docs/perf)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda, cpu with --tiny")
    ap.add_argument("--tiny", action="store_true", help="a 2-block width-64 Wan (4 heads) on 48 tokens (CPU check)")
    ap.add_argument("--model", choices=["1.3B", "14B"], default="14B")
    ap.add_argument("--latent", type=int, nargs=4, default=list(wan.LATENT_480P_81F), metavar=("C", "F", "H", "W"))
    ap.add_argument("--text-len", type=int, default=wan.TEXT_LEN)
    ap.add_argument("--cp-degree", type=int, default=8, help="ranks per sample (Ulysses); world / cp data-parallel")
    ap.add_argument("--samples-per-group", type=int, default=1, help="samples per data-parallel group")
    ap.add_argument("--activation-checkpoint", choices=["none", "selective", "full"], default="full")
    ap.add_argument("--mixed-precision", choices=["auto", "none", "bfloat16"], default="auto")
    ap.add_argument("--autocast", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--steps", type=int, default=2, help="timed steps (median), after one warm-up step")
    ap.add_argument("--budget-s", type=float, default=1e9, help="seconds this process may take: the profiled step is "
                    "skipped when it would not fit")  # fmt: skip
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=wan.PEAK_TFLOPS)
    ap.add_argument("--label", default="config")
    args = ap.parse_args()
    if args.table:
        result = build_table(args.table, args.projection)
        print((args.table / "wan_parallel.md").read_text(), flush=True)
        sys.exit(0 if result["rows"] else 1)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args.out.mkdir(parents=True, exist_ok=True)
    code = run_config(args)
    sys.stdout.flush()
    # after a recorded failure, skip the process group's teardown: a peer may still sit in a collective
    os._exit(code) if code else sys.exit(0)


if __name__ == "__main__":
    main()
