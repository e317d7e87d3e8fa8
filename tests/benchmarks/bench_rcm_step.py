"""Benchmark of the whole rCM step on one device: forward, JVP, forward+backward, rCM step, memory and MFU.

A script, not a test. For each DiT it builds the Distiller exactly as `scripts/torchrun_rcm.py` does (same
arguments, one process; FSDP2 mixed precision bf16 on CUDA, the fused attention kernel, the chosen activation
checkpointing policy) and times, on one sample of the default 32,400 tokens:
  forward   student(x_t, t, cond) under no_grad;
  JVP       torch.func.jvp of the student in (x_t, t) under no_grad, as sCM runs it (primal + tangent);
  fwd+bwd   student(x_t, t, cond).sum().backward() (checkpointing as configured);
  rCM step  Distiller.train_step() (critic update, sCM + DMD student update, EMA).

MFU = model FLOPs / time / peak, peak = 989 TFLOP/s (dense bf16, H100/H200 SXM). Model FLOPs count each
matmul once (no recompute):
  linear   L = FLOPs of aten mm/addmm in one forward, counted by torch.utils.flop_counter.FlopCounterMode
           (attention is a Triton kernel the counter does not see; on a CPU the math path's bmm is left out);
  attention A = 4*B*N^2*D per self-attention (D = model width = H*Dh) + 4*B*N*Lc*D per cross-attention;
  forward F = L + A;  JVP (primal + tangent) = 2L + 3A;  backward = 2L + 2.5A;
  rCM step = 10 forwards + 1 JVP tangent (L + 2A) + 3 backwards, with critic_ratio = max_rollout_steps = 1
           and exact time derivative: critic (student rollout, fake score), teacher CFG pair x2 (= 4 rows),
           student JVP primal, student forward, student rollout, fake score; backwards of the fake score,
           the student's sCM forward and its rollout.
The JVP's "floor" is its model FLOPs over the forward's (2L + 3A) / (L + A), at the forward's MFU.

Also: `--profile` writes the top CUDA kernels of one forward and one JVP (torch.profiler) with a breakdown
into GEMM / attention / other; `--loss-steps N` runs N rCM steps of a small DiT from a fixed seed and writes
their losses (to compare code paths: bitwise, or within bf16 tolerance).

    PYTHONPATH=. python tests/benchmarks/bench_rcm_step.py --out runs/step [--dits 0.41B,1.42B]
        [--activation-checkpoint full|selective|none] [--profile] [--loss-steps 20]
    PYTHONPATH=. python tests/benchmarks/bench_rcm_step.py --device cpu --tiny --out runs/step   # smoke check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = 989.0  # dense bf16 tensor-core peak, H100/H200 SXM
# name -> torchrun_rcm.py arguments (32,400 tokens per sample at its defaults: 360 x 360 x 16, patch 2)
DITS = {
    "0.41B": ["--dim", "1536", "--depth", "8", "--heads", "12"],
    "1.42B": ["--dim", "2048", "--depth", "16", "--heads", "16"],
    "tiny": [
        "--image-size",
        "16",
        "--channels",
        "4",
        "--dim",
        "64",
        "--depth",
        "2",
        "--heads",
        "2",
        "--cond-len",
        "8",
        "--cond-dim",
        "32",
    ],  # fmt: skip
}
# the loss trace: a 0.41B-width DiT on 4,096 tokens, so 20 steps take seconds
LOSS_DIT = ["--dim", "1536", "--depth", "8", "--heads", "12", "--image-size", "128"]
LOSS_DIT_TINY = DITS["tiny"]
LINEAR_OPS = ("aten.mm", "aten.addmm")


def load_torchrun_rcm():
    spec = importlib.util.spec_from_file_location("torchrun_rcm", ROOT / "scripts" / "torchrun_rcm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def init_single_process(device: str) -> torch.device:
    """A one-rank process group (the Distiller's networks go through FSDP2 for mixed precision)."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if device == "cuda":
            torch.cuda.set_device(0)
            dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
        else:
            dist.init_process_group("gloo")
    return torch.device(device, 0) if device == "cuda" else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, reps: int, warmup: int = 1) -> tuple[float, float, list[float]]:
    """(median s, peak GiB allocated during the timed calls, all times); `warmup` calls first (autotune)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak, times


def linear_flops(fn) -> dict[str, float]:
    """FLOPs of aten mm/addmm (and all counted ops) in one call of fn, by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts().get("Global", {})
    by_op = {str(op): float(n) for op, n in counts.items()}
    return {"linear": sum(v for k, v in by_op.items() if k in LINEAR_OPS), "all": float(sum(by_op.values()))}


def attention_flops(cfg, tokens: int, cond_len: int, batch: int = 1) -> float:
    """Analytic FLOPs of one forward's attention: QK^T and PV, 2 GEMMs of 2*N*Nk*D each, per block."""
    per_block = 4 * batch * tokens * tokens * cfg.dim + (4 * batch * tokens * cond_len * cfg.dim if cfg.cond_dim else 0)
    return per_block * cfg.depth


def profile_breakdown(fn, device: torch.device, top: int = 15) -> dict:
    """Top CUDA kernels of one call of fn, and the split GEMM / attention / other (ms)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = totals.setdefault(e.name, [0.0, 0])
        entry[0] += e.time_range.elapsed_us() / 1e3
        entry[1] += 1
    split = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for name, (ms, _) in totals.items():
        split[kernel_category(name)] += ms
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "split_ms": {k: round(v, 2) for k, v in split.items()},
        "gemm_launches": sum(n for name, (_, n) in totals.items() if kernel_category(name) == "gemm"),
        "top": [(name[:110], round(ms, 2), n) for name, (ms, n) in ranked],
    }


def kernel_category(name: str) -> str:
    low = name.lower()
    if "attn" in low or "attention" in low or low in ("_fused_fwd_kernel", "_primal_fwd_kernel"):  # ours (Gluon)
        return "attention"
    if any(s in low for s in ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "ampere_", "cublas", "matmul")):
        return "gemm"
    return "other"


def common_argv(args) -> list[str]:
    """torchrun_rcm.py arguments shared by every run: checkpointing, precision, one critic and rollout step."""
    argv = ["--activation-checkpointing", args.activation_checkpoint, "--critic-ratio", "1", "--max-rollout-steps", "1"]
    return argv + (["--mixed-precision", args.mixed_precision] if args.mixed_precision else [])


def bench_dit(name: str, args, trc, device: torch.device) -> dict:
    argv = DITS[name] + common_argv(args)
    targs = trc.parse_args(argv)
    distiller, cfg, pconfig = trc.build_distiller(targs, device)
    tokens = (cfg.image_size // cfg.patch_size) ** 2
    student = distiller.student
    gen = torch.Generator(device=device).manual_seed(1)
    x0, cond = distiller.task.sample(1, generator=gen)
    x_t = torch.randn(x0.shape, generator=gen, device=device)
    t = torch.full((1,), 0.7, device=device)  # TrigFlow time, float32 as the Distiller draws it
    v = torch.randn(x0.shape, generator=gen, device=device)

    def forward():
        with torch.no_grad():
            return student(x_t, t, cond)

    def jvp():
        with torch.no_grad():
            return torch.func.jvp(lambda x, tt: student(x, tt, cond), (x_t, t), (v, torch.ones_like(t)))

    def fwd_bwd():
        student(x_t, t, cond).float().square().mean().backward()

    reps, step_reps = (args.reps, args.steps) if device.type == "cuda" else (1, 1)
    row: dict = {"dit": name, "params_b": round(sum(p.numel() for p in student.parameters()) / 1e9, 3),
                 "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.num_heads, "tokens": tokens,
                 "activation_checkpointing": pconfig.activation_checkpointing,
                 "mixed_precision": pconfig.mixed_precision}  # fmt: skip
    # the critic rollout runs the student once before sCM's JVP (see rcm_core.parallel.fsdp): do the same
    forward()
    fl_fwd = linear_flops(forward)
    fl_jvp = linear_flops(jvp)
    lin = fl_fwd["linear"]
    attn = attention_flops(cfg, tokens, targs.cond_len)
    row.update(linear_tflop=lin / 1e12, attention_tflop=attn / 1e12,
               flopcounter_jvp_over_fwd_linear=round(fl_jvp["linear"] / lin, 3))  # fmt: skip
    model = {"forward": lin + attn, "jvp": 2 * lin + 3 * attn, "fwd_bwd": 3 * lin + 3.5 * attn}
    model["rcm_step"] = 10 * (lin + attn) + (lin + 2 * attn) + 3 * (2 * lin + 2.5 * attn)
    for key, fn, n in (("forward", forward, reps), ("jvp", jvp, reps), ("fwd_bwd", fwd_bwd, reps),
                       ("rcm_step", distiller.train_step, step_reps)):  # fmt: skip
        sec, peak, all_s = time_fn(fn, device, n, warmup=1)
        if key == "fwd_bwd":
            distiller.student.zero_grad(set_to_none=True)
        tflops = model[key] / sec / 1e12
        row[key] = {"ms": round(sec * 1e3, 2), "tflops": round(tflops, 1), "mfu": round(tflops / PEAK_TFLOPS, 4),
                    "peak_gib": round(peak, 2), "model_tflop": round(model[key] / 1e12, 2),
                    "all_ms": [round(s * 1e3, 1) for s in all_s]}  # fmt: skip
        print(f"  {name} {key:9s} {sec * 1e3:9.1f} ms  {tflops:6.1f} TFLOP/s  MFU {tflops / PEAK_TFLOPS:6.1%}  "
              f"peak {peak:6.2f} GiB", flush=True)  # fmt: skip
    fwd_ms = row["forward"]["ms"]
    floor = model["jvp"] / model["forward"]
    row["jvp_over_forward"] = round(row["jvp"]["ms"] / fwd_ms, 3)
    row["jvp_floor_over_forward"] = round(floor, 3)
    row["jvp_over_floor"] = round(row["jvp"]["ms"] / fwd_ms / floor, 3)
    row["fwd_bwd_over_forward"] = round(row["fwd_bwd"]["ms"] / fwd_ms, 3)
    row["step_in_forwards"] = round(row["rcm_step"]["ms"] / fwd_ms, 2)
    if args.profile and device.type == "cuda":
        row["profile"] = {"forward": profile_breakdown(forward, device), "jvp": profile_breakdown(jvp, device)}
    del distiller
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return row


def loss_trace(args, trc, device: torch.device) -> list[float]:
    argv = (LOSS_DIT_TINY if args.tiny else LOSS_DIT) + common_argv(args) + ["--steps", str(args.loss_steps)]
    distiller, _, _ = trc.build_distiller(trc.parse_args(argv), device)
    losses = [float(distiller.train_step()["loss"]) for _ in range(args.loss_steps)]
    del distiller
    return losses


def table(rows: list[dict]) -> str:
    lines = [
        "| DiT | AC | forward | JVP (primal+tangent) | fwd+bwd | rCM step | step MFU | peak GiB (step) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['dit']} | {r['activation_checkpointing']} | out of memory | | | | | |")
            continue
        f, j, fb, s = r["forward"], r["jvp"], r["fwd_bwd"], r["rcm_step"]
        lines.append(
            f"| {r['dit']} ({r['dim']} x {r['depth']}) | {r['activation_checkpointing']} | {f['ms']:.1f} ms, "
            f"{f['mfu']:.1%} MFU | {j['ms']:.1f} ms = {r['jvp_over_forward']:.2f}x fwd "
            f"({r['jvp_over_floor']:.2f}x floor {r['jvp_floor_over_forward']:.2f}x), {j['mfu']:.1%} | "
            f"{fb['ms']:.1f} ms = {r['fwd_bwd_over_forward']:.2f}x, {fb['mfu']:.1%} | {s['ms'] / 1e3:.3f} s = "
            f"{r['step_in_forwards']:.1f} fwd | **{s['mfu']:.1%}** | {s['peak_gib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/step_bench"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-block width-64 DiT on 64 tokens (smoke check)")
    ap.add_argument("--dits", default=None, help=f"comma-separated, of {sorted(DITS)} (default 0.41B,1.42B; tiny)")
    ap.add_argument("--activation-checkpoint", choices=["none", "full", "selective"], default="full")
    ap.add_argument("--mixed-precision", choices=["none", "bfloat16"], default=None, help="default: bf16 on CUDA")
    ap.add_argument("--reps", type=int, default=5, help="timed calls of forward / JVP / fwd+bwd (median)")
    ap.add_argument("--steps", type=int, default=3, help="timed rCM steps (median), after one warm-up step")
    ap.add_argument("--profile", action="store_true", help="top CUDA kernels of one forward and one JVP")
    ap.add_argument("--loss-steps", type=int, default=0, help="also run this many rCM steps and save the losses")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    device = init_single_process(args.device)
    trc = load_torchrun_rcm()
    args.out.mkdir(parents=True, exist_ok=True)
    header = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "label": args.label,
        "argv": sys.argv[1:],
    }
    with contextlib.suppress(ImportError):
        import triton

        header["triton"] = triton.__version__
    print(f"== {header}", flush=True)
    result: dict = {**header, "peak_tflops": PEAK_TFLOPS, "rows": []}
    dits = args.dits if args.dits is not None else ("tiny" if args.tiny else "0.41B,1.42B")
    names = [n for n in dits.split(",") if n]
    for name in names:
        try:
            result["rows"].append(bench_dit(name, args, trc, device))
        except torch.OutOfMemoryError as e:  # e.g. no checkpointing on the larger DiT: record it and go on
            print(f"  {name}: out of memory ({str(e)[:200]})", flush=True)
            result["rows"].append({"dit": name, "activation_checkpointing": args.activation_checkpoint, "oom": True})
            gc.collect()
            torch.cuda.empty_cache()
    if args.loss_steps:
        result["losses"] = loss_trace(args, trc, device)
        print(f"  losses ({args.loss_steps} steps): {result['losses']}", flush=True)
    tag = f"_{args.label}" if args.label else ""
    (args.out / f"rcm_step{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = f"{header['date']}, {header['device']}, torch {header['torch']}, {' '.join(sys.argv[1:])}\n\n" + table(
        result["rows"]
    )
    for r in result["rows"]:
        for phase, prof in r.get("profile", {}).items():
            md += f"\n{r['dit']} {phase}: split {prof['split_ms']} ms, {prof['gemm_launches']} GEMM launches\n"
            md += "".join(f"  {ms:8.2f} ms  x{n:<4d} {kname}\n" for kname, ms, n in prof["top"])
    (args.out / f"rcm_step{tag}.md").write_text(md)
    print(md, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
