"""Benchmark of the fused attention forward+JVP kernel (rcm_core/kernels/attention_jvp.py) on one GPU.

A script, not a test. In one run it
  1. sweeps correctness at large shapes in bf16 and fp16: relative L2 error of O and O_t (fused kernel, and the
     primal + tangent-only kernels that torch.func.jvp uses) and of dQ/dK/dV, against a float64 oracle, judged
     against the same computation in PyTorch at the inputs' precision (pass: err <= 2x + atol);
  2. optionally (--sweep) times pinned launch configs of each kernel mode, to choose the autotune lists;
  3. times, per shape: the fused kernel, torch.func.jvp through `attention`, PyTorch SDPA forward only (flash,
     cuDNN), torch.func.jvp over SDPA's math backend ("OOM" when it does not fit) and the published rCM Triton
     kernel (github.com/NVlabs/rcm, rcm/utils/flash_attention_jvp_triton.py; kept out of the repository, loaded
     from --published PATH, by default .bench/flash_attention_jvp_triton.py when that file exists; only its
     forward+JVP is timed, so its flash_attn/einops imports are stubbed when absent);
and prints the table, appends CSV rows to OUT/attention_jvp_bench.csv and writes OUT/attention_jvp_bench.md.

Timing: triton.testing.do_bench median (CUDA events), after a warm-up call that also runs the autotuner.
TFLOP/s counts 12*B*H*Nq*Nk*D for forward+JVP (6 GEMMs) and 4*B*H*Nq*Nk*D for SDPA forward (2 GEMMs).
Peak memory: torch.cuda.max_memory_allocated during one call, inputs included.

    PYTHONPATH=. python tests/benchmarks/bench_attention_jvp.py --out runs/bench [--published PATH]
        [--published-configs "case=BM,BN,WARPS,STAGES;case=auto"] [--sweep CASES]
"""

import argparse
import concurrent.futures
import csv
import datetime
import importlib
import importlib.util
import inspect
import math
import multiprocessing
import os
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from rcm_core.kernels import (
    attention,
    attention_backward,
    attention_forward,
    attention_jvp_forward,
    attention_jvp_ref,
    attention_tangent_forward,
)

kernel_module = importlib.import_module("rcm_core.kernels.attention_jvp")

# (name, B, H, Nq, Nk, D)
BENCH_SHAPES = [
    ("self-4k-d128", 1, 12, 4096, 4096, 128),
    ("self-16k-d128", 1, 12, 16384, 16384, 128),
    ("self-32760-d128", 1, 12, 32760, 32760, 128),
    ("self-4k-d64-b4h32", 4, 32, 4096, 4096, 64),
    ("self-8190-d64-b2h16", 2, 16, 8190, 8190, 64),
    ("cross-32760x512-d128", 1, 12, 32760, 512, 128),
]
# (B, H, Nq, Nk, D, kv_seqlens or None, check grads)
CHECK_SHAPES = [
    (1, 12, 4096, 4096, 128, None, True),
    (2, 8, 2048, 2048, 64, None, True),
    (1, 4, 1000, 1000, 32, None, True),
    (1, 12, 8190, 512, 128, None, False),
    (2, 4, 1500, 1500, 256, None, True),
    (2, 4, 2000, 512, 128, [512, 77], True),
]
ATOL = {torch.float16: 1e-4, torch.bfloat16: 1e-3}
# where the published kernel's source is kept, out of the repository (.bench/ is git-ignored)
PUBLISHED_PATH = Path(".bench/flash_attention_jvp_triton.py")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def log(msg: str, fh=None) -> None:
    print(msg, flush=True)
    if fh is not None:
        fh.write(msg + "\n")
        fh.flush()


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(B, H, Nq, Nk, D, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D)] * 2
    return [torch.randn(s, generator=g, device="cuda", dtype=torch.float32).to(dtype) for s in shapes]


def verdict(err: float, base: float, dtype) -> str:
    return "PASS" if math.isfinite(err) and err <= 2 * base + ATOL[dtype] else "FAIL"


# -- correctness ---------------------------------------------------------------------------------------------------


def check_case(case, dtype, seed, published, fh) -> bool:
    B, H, Nq, Nk, D, lens, grads = case
    q, k, v, q_t, k_t, v_t = make_inputs(B, H, Nq, Nk, D, dtype, seed)
    kv = torch.tensor(lens, device="cuda") if lens else None
    ref_o, ref_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t, kv_seqlens=kv)
    same_o, same_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t, kv_seqlens=kv, upcast=False)
    base_o, base_t = rel_l2(same_o, ref_o), rel_l2(same_t, ref_t)
    del same_o, same_t
    results = []
    sm90 = kernel_module._sm90_eligible(q, k, v, q_t, k_t, v_t, kv)  # the Gluon Hopper kernel runs "fused"
    o, o_t, lse = attention_jvp_forward(q, k, v, q_t, k_t, v_t, kv_seqlens=kv)
    tag = "fused sm90" if sm90 else "fused"
    results += [(f"{tag} o", rel_l2(o, ref_o), base_o), (f"{tag} o_t", rel_l2(o_t, ref_t), base_t)]
    o2, lse2 = attention_forward(q, k, v, kv_seqlens=kv)
    o2_t = attention_tangent_forward(q, k, v, o2, lse2, q_t, k_t, v_t, kv_seqlens=kv)
    tag_t = "tangent sm90" if sm90 else "tangent"
    sm90_p = kernel_module._sm90_eligible(q, k, v, None, None, None, kv, need_tangents=False)
    tag_p = "primal sm90" if sm90_p else "primal"
    results += [(f"{tag_p} o", rel_l2(o2, ref_o), base_o), (f"{tag_t} o_t", rel_l2(o2_t, ref_t), base_t)]
    o3, o3_t, _ = kernel_module._launch_fwd(
        kernel_module.MODE_FUSED, q, k, v, q_t, k_t, v_t, None, D**-0.5, kv, use_tma=False
    )
    results += [("fused no-TMA o_t", rel_l2(o3_t, ref_t), base_t)]
    o4, o4_t, _ = kernel_module._launch_fwd(
        kernel_module.MODE_FUSED, q, k, v, q_t, k_t, v_t, None, D**-0.5, kv, use_tma=True
    )
    results += [("fused Triton o_t" if sm90 else "fused TMA o_t", rel_l2(o4_t, ref_t), base_t)]
    if published is not None and (B, H, Nq, Nk, D) == (1, 12, 4096, 4096, 128) and dtype == torch.bfloat16:
        p_o, p_t = published_call(published, q, k, v, q_t, k_t, v_t)
        results += [("published o", rel_l2(p_o, ref_o), base_o), ("published o_t", rel_l2(p_t, ref_t), base_t)]
    if grads:
        do = make_inputs(B, H, Nq, Nk, D, dtype, seed + 1)[0]
        dq, dk, dv = attention_backward(do, q, k, v, o2, lse2, kv_seqlens=kv)
        leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        ref_g = torch.autograd.grad(attention_jvp_ref(*leaves64, kv_seqlens=kv)[0], leaves64, do.double())
        same_g = torch.autograd.grad(attention_jvp_ref(*leaves, kv_seqlens=kv, upcast=False)[0], leaves, do)
        for name, g, s, r in zip(("dq", "dk", "dv"), (dq, dk, dv), same_g, ref_g, strict=True):
            results.append((name, rel_l2(g, r), rel_l2(s, r)))
    ok = True
    for name, err, base in results:
        v_ = verdict(err, base, dtype)
        ok &= v_ == "PASS"
        log(f"  {str(dtype)[6:]:9s} {B}x{H}x{Nq}x{Nk}x{D} lens={lens}  {name:18s} err {err:.2e}  "
            f"torch {base:.2e}  {v_}", fh)  # fmt: skip
    return ok


# -- timing --------------------------------------------------------------------------------------------------------


def gpu_state() -> str:
    """SM clock, power and temperature now (NVML through torch), to read run-to-run timing spread against."""
    try:
        return (f"SM {torch.cuda.clock_rate()} MHz, {torch.cuda.power_draw() / 1000:.0f} W, "
                f"{torch.cuda.temperature()} C")  # fmt: skip
    except Exception as e:  # no NVML
        return f"GPU state unavailable ({type(e).__name__})"


def measure(fn, rep_ms):
    """(median ms, peak GB) or raises torch.OutOfMemoryError."""
    fn()  # warm-up; runs the autotuner on first use
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1e9
    ms = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    return ms, peak


def providers(q, k, v, q_t, k_t, v_t, published, want_published):
    D = q.shape[-1]

    def fused():
        return attention_jvp_forward(q, k, v, q_t, k_t, v_t)

    def fused_triton():
        # use_tma forced: the Triton kernel even where the Gluon Hopper kernel would be dispatched
        return kernel_module._launch_fwd(kernel_module.MODE_FUSED, q, k, v, q_t, k_t, v_t, None, D**-0.5, None,
                                         use_tma=True)  # fmt: skip

    def func_jvp():
        return torch.func.jvp(attention, (q, k, v), (q_t, k_t, v_t))

    def func_jvp_triton():
        # the jvp rule's tangent kernel forced to the Triton one (RCM_ATTN_SM90=0 for this call)
        saved = os.environ.get("RCM_ATTN_SM90")
        os.environ["RCM_ATTN_SM90"] = "0"
        try:
            return torch.func.jvp(attention, (q, k, v), (q_t, k_t, v_t))
        finally:
            if saved is None:
                del os.environ["RCM_ATTN_SM90"]
            else:
                os.environ["RCM_ATTN_SM90"] = saved

    def primal():
        return attention_forward(q, k, v)

    def primal_triton():
        return kernel_module._launch_fwd(kernel_module.MODE_PRIMAL, q, k, v, None, None, None, None, D**-0.5, None,
                                         use_tma=True)  # fmt: skip

    def sdpa(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    def math_jvp():
        with sdpa_kernel([SDPBackend.MATH]):
            return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (q_t, k_t, v_t))

    out = {"ours fused fwd+jvp": (fused, 12), "ours fused, Triton kernel only": (fused_triton, 12),
           "ours torch.func.jvp(attention)": (func_jvp, 12),
           "ours torch.func.jvp(attention), Triton only": (func_jvp_triton, 12),
           "ours primal fwd": (primal, 4), "ours primal fwd, Triton only": (primal_triton, 4)}  # fmt: skip
    if want_published:
        pub_fn = None if published is None else lambda: published_call(published, q, k, v, q_t, k_t, v_t)
        out["published rCM fwd+jvp"] = (pub_fn, 12)
    out["sdpa flash fwd only"] = (sdpa(SDPBackend.FLASH_ATTENTION), 4)
    out["sdpa cudnn fwd only"] = (sdpa(SDPBackend.CUDNN_ATTENTION), 4)
    out["func.jvp sdpa math"] = (math_jvp, 12)
    return out


def bench_shapes(shapes, dtype, published, rep_ms, fh, deadline, on_shape_done, published_configs=None):
    rows = []
    for name, B, H, Nq, Nk, D in shapes:
        q, k, v, q_t, k_t, v_t = make_inputs(B, H, Nq, Nk, D, dtype, seed=1234)
        log(f"  {name}: {gpu_state()}", fh)
        pub = published
        if published is not None and published_configs is not None:
            # pin the published autotuner (its ~110 s compile of 36 configs per new shape) to a given config, or
            # give it back its own full list ("auto")
            pin = published_configs.get(name)
            pub = None if pin is None else published
            if pin == "auto":
                published._attn_fwd.configs = published.full_configs
            elif pin is not None:
                bm, bn, w, st = pin
                published._attn_fwd.configs = [
                    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                ]
                published._attn_fwd.cache.clear()
        for prov, (fn, gemms) in providers(q, k, v, q_t, k_t, v_t, pub, published is not None).items():
            t0 = time.time()
            if fn is None or (t0 > deadline and not prov.startswith("ours")):
                reason = "past --deadline-s" if fn is not None else "not pinned by --published-configs"
                rows.append(dict(case=name, B=B, H=H, Nq=Nq, Nk=Nk, D=D, dtype=str(dtype)[6:], provider=prov,
                                 ms="skipped", tflops="", peak_gb="", note=reason))  # fmt: skip
                log(f"  {name:22s} {prov:32s} skipped ({reason})", fh)
                continue
            try:
                ms, peak = measure(fn, rep_ms)
                tflops = gemms * B * H * Nq * Nk * D / (ms * 1e-3) / 1e12
                cell = dict(ms=f"{ms:.3f}", tflops=f"{tflops:.0f}", peak_gb=f"{peak:.2f}")
                if prov == "ours fused fwd+jvp":
                    cell["note"] = "Gluon sm90 kernel" if kernel_module._sm90_eligible(q, k, v, q_t, k_t, v_t, None) \
                        else "Triton kernel"  # fmt: skip
                if prov == "ours fused fwd+jvp" and B * H * Nq * Nk <= 12 * 4096 * 4096:
                    # the autotuned config's output, against the float64 oracle (which needs ~5 N^2 buffers)
                    ref_t = attention_jvp_ref(q, k, v, q_t, k_t, v_t)[1]
                    cell["note"] += f"; o_t rel err {rel_l2(fn()[1], ref_t):.1e}"
                    del ref_t
            except torch.OutOfMemoryError:
                cell = dict(ms="OOM", tflops="", peak_gb="")
            except Exception as e:  # a backend that does not run this shape/dtype
                cell = dict(ms="error", tflops="", peak_gb="", note=f"{type(e).__name__}: {str(e)[:120]}")
            torch.cuda.empty_cache()
            row = dict(case=name, B=B, H=H, Nq=Nq, Nk=Nk, D=D, dtype=str(dtype)[6:], provider=prov, **cell)
            rows.append(row)
            log(f"  {name:22s} {prov:32s} {cell['ms']:>9s} ms {cell['tflops']:>5s} TFLOP/s "
                f"{cell['peak_gb']:>6s} GB  ({time.time() - t0:.1f}s) {cell.get('note', '')}", fh)  # fmt: skip
        del q, k, v, q_t, k_t, v_t
        torch.cuda.empty_cache()
        on_shape_done(rows)
    return rows


def sweep_configs(shapes, dtype, rep_ms, fh):
    """Time (and, where the float64 oracle fits, check) pinned configs of each forward mode."""
    extra = {
        kernel_module.MODE_FUSED: {
            128: [(128, 32, 8, 4), (64, 64, 4, 1, True)],
            64: [(128, 128, 8, 2, True), (128, 64, 8, 4, True), (128, 32, 4, 4, True)],
        },
        kernel_module.MODE_TANGENT: {128: [(128, 128, 8, 2)], 64: [(64, 128, 4, 2)]},
        kernel_module.MODE_PRIMAL: {128: [(128, 64, 4, 3)], 64: [(64, 128, 4, 3)]},
    }
    gemm_flops = {kernel_module.MODE_PRIMAL: 4, kernel_module.MODE_FUSED: 12, kernel_module.MODE_TANGENT: 10}
    for name, B, H, Nq, Nk, D in shapes:
        q, k, v, q_t, k_t, v_t = make_inputs(B, H, Nq, Nk, D, dtype, seed=99)
        o, lse = attention_forward(q, k, v)
        ref = attention_jvp_ref(q, k, v, q_t, k_t, v_t) if B * H * Nq * Nk <= 4 * 32 * 4096 * 4096 else None
        for mode in (kernel_module.MODE_FUSED, kernel_module.MODE_TANGENT, kernel_module.MODE_PRIMAL):
            tiles = kernel_module._FWD_TILES[mode][D] + extra[mode].get(D, [])
            for bm, bn, w, s, lazy in map(kernel_module._fwd_tile, tiles):
                for use_tma in (True, False) if mode == kernel_module.MODE_FUSED and bn == 32 else (True,):
                    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, LAZY_RESCALE=lazy)
                    args = (mode, q, k, v, q_t, k_t, v_t, o if mode == kernel_module.MODE_TANGENT else None)
                    t0 = time.time()

                    def run(a=args, c=cfg, t=use_tma, x=lse, sc=D**-0.5):
                        return kernel_module._launch_fwd(*a, sc, None, lse=x, config=c, use_tma=t)

                    try:
                        res = run()
                        torch.cuda.synchronize()
                        compile_s = time.time() - t0
                        ms = triton.testing.do_bench(run, warmup=25, rep=rep_ms, return_mode="median")
                        tf = gemm_flops[mode] * B * H * Nq * Nk * D / (ms * 1e-3) / 1e12
                        msg = f"{ms:8.3f} ms {tf:5.0f} TFLOP/s (first call {compile_s:.1f}s)"
                        if ref is not None:
                            out = res[0] if mode == kernel_module.MODE_PRIMAL else res[1]
                            msg += f" err {rel_l2(out, ref[0] if mode == kernel_module.MODE_PRIMAL else ref[1]):.1e}"
                    except Exception as e:
                        msg = f"failed {type(e).__name__}: {str(e)[:150]}"
                    tag = f"{bm}x{bn} w{w} s{s}{' lazy' if lazy else ''}"
                    log(f"  sweep {name:20s} mode={mode} tma={int(use_tma)} {tag}: {msg}", fh)
        del q, k, v, q_t, k_t, v_t, o, lse, ref
        torch.cuda.empty_cache()


# -- published kernel ----------------------------------------------------------------------------------------------


def load_published(path: str):
    """Import the published kernel file; stub its backward-only imports when the packages are absent."""
    for mod, attrs in (("einops", ("rearrange",)),):
        try:
            importlib.import_module(mod)
        except ImportError:
            stub = types.ModuleType(mod)
            for a in attrs:
                setattr(stub, a, None)
            sys.modules[mod] = stub
    try:
        importlib.import_module("flash_attn.flash_attn_interface")
    except ImportError:
        sys.modules["flash_attn"] = types.ModuleType("flash_attn")
        fai = types.ModuleType("flash_attn.flash_attn_interface")
        fai._flash_attn_backward = fai._flash_attn_varlen_backward = None
        sys.modules["flash_attn.flash_attn_interface"] = fai
    spec = importlib.util.spec_from_file_location("published_rcm_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.full_configs = list(module._attn_fwd.configs)  # its own autotune list, before any pinning
    # its first release took (q, k, v, tq, tk, tv, causal, sm_scale), the current one (q, k, v, tq, tk, tv, sm_scale)
    module.takes_causal = "causal" in inspect.signature(module._attention.forward).parameters
    return module


def published_call(published, q, k, v, q_t, k_t, v_t):
    scale = q.shape[-1] ** -0.5
    if published.takes_causal:
        return published.attention(q, k, v, q_t, k_t, v_t, False, scale)
    return published.attention(q, k, v, q_t, k_t, v_t, scale)


def _compile_published_config(path: str, shape: tuple, index: int) -> str:
    """Worker: compile (into Triton's on-disk cache) and run one of the published kernel's configs on one shape."""
    published = load_published(path)
    published._attn_fwd.configs = [published.full_configs[index]]
    _, B, H, Nq, Nk, D = shape
    try:
        published_call(published, *make_inputs(B, H, Nq, Nk, D, torch.bfloat16, seed=0))
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # a config that does not fit; its autotuner skips it the same way
        return type(e).__name__


def precompile_published(path: str, shapes, workers: int, fh) -> None:
    """Fill Triton's on-disk cache with every config of the published kernel for `shapes`, in parallel.

    Its autotuner then times all its configs and picks its own, as shipped, without ~3 s of serial compile per
    config and shape (the compiled binaries are the same: same source, constexprs and launch options).
    """
    ctx = multiprocessing.get_context("spawn")
    n = len(load_published(path).full_configs)
    t0 = time.time()
    jobs = [(path, shape, i) for shape in shapes for i in range(n)]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        results = list(pool.map(_compile_published_config, *zip(*jobs, strict=True)))
    failed = sum(r != "ok" for r in results)
    log(f"  precompiled the published kernel: {len(jobs)} (shape, config) pairs in {time.time() - t0:.0f} s "
        f"with {workers} processes ({failed} did not run)", fh)  # fmt: skip


# -- output --------------------------------------------------------------------------------------------------------


def write_outputs(rows, out_dir: Path, header: dict, command: str, csv_rows: bool = True) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = ["date", "gpu", "torch", "triton", "case", "B", "H", "Nq", "Nk", "D", "dtype", "provider", "ms",
              "tflops", "peak_gb", "note"]  # fmt: skip
    csv_path = out_dir / "attention_jvp_bench.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows if csv_rows else []:
            w.writerow({**header, **{k: r.get(k, "") for k in fields if k not in header}})
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    lines = [
        f"{header['date']}, {header['gpu']}, torch {header['torch']}, triton {header['triton']}, "
        f"dtype {rows[0]['dtype']}. Command: `{command}`",
        "",
        "Median ms (TFLOP/s, peak GB incl. inputs). TFLOP/s counts 12*B*H*Nq*Nk*D for fwd+JVP, 4*B*H*Nq*Nk*D "
        "for SDPA forward.",
        "",
        "| case | " + " | ".join(provs) + " |",
        "|---|" + "---|" * len(provs),
    ]
    for c in cases:
        cells = []
        for p in provs:
            r = next((r for r in rows if r["case"] == c and r["provider"] == p), None)
            if r is None or r["ms"] in ("OOM", "error", "skipped"):
                cells.append("n/a" if r is None else r["ms"])
            else:
                cells.append(f"{r['ms']} ({r['tflops']}, {r['peak_gb']} GB)")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out_dir / "attention_jvp_bench.md").write_text(table)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".", help="directory for attention_jvp_bench.{csv,md} and the log")
    ap.add_argument(
        "--published",
        default=str(PUBLISHED_PATH) if PUBLISHED_PATH.exists() else None,
        help=f"path of the published rCM flash_attention_jvp_triton.py (default: {PUBLISHED_PATH} if present)",
    )
    ap.add_argument(
        "--published-configs",
        default=None,
        help="pin the published kernel per case, 'case=BM,BN,WARPS,STAGES;case=auto;...' (auto: its own full "
        "autotune; cases not named skip it)",
    )
    ap.add_argument(
        "--published-precompile",
        type=int,
        default=0,
        help="compile the published kernel's configs for the cases pinned 'auto' in this many processes first",
    )
    ap.add_argument("--check-cases", default=None, help="comma-separated indices into CHECK_SHAPES (default: all)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--shapes", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--sweep", default=None, help="comma-separated case names whose pinned configs to time")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--deadline-s", type=float, default=1e9, help="after this many seconds time only our kernels")
    args = ap.parse_args()
    t_start = time.time()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    fh = (out_dir / "attention_jvp_bench.log").open("a")
    command = "python " + " ".join(sys.argv)
    header = dict(
        date=datetime.date.today().isoformat(),
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
    )
    log(f"== {header} | {command}", fh)
    published = load_published(args.published) if args.published else None
    pins = None
    if args.published_configs:
        pins = {}
        for item in args.published_configs.split(";"):
            case, value = item.split("=")
            pins[case] = value if value == "auto" else tuple(int(x) for x in value.split(","))
        if published is not None and pins.get("self-4k-d128", "auto") != "auto":  # the correctness check runs it
            bm, bn, w, st = pins["self-4k-d128"]
            published._attn_fwd.configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)]
    shapes = [s for s in BENCH_SHAPES if args.shapes is None or s[0] in args.shapes.split(",")]

    if published is not None and args.published_precompile and pins is not None:
        auto = [s for s in shapes if pins.get(s[0]) == "auto"]
        precompile_published(args.published, auto, args.published_precompile, fh)

    if not args.skip_check:
        log("== correctness (rel L2 vs float64; pass: err <= 2 x torch same-precision err + atol)", fh)
        # one config per kernel here (compile time); the sweep and the timing section cover the others
        saved = (kernel_module._FWD_TILES, kernel_module._BWD_TILES)
        kernel_module._FWD_TILES = {m: {d: t[:1] for d, t in by_d.items()} for m, by_d in saved[0].items()}
        kernel_module._BWD_TILES = {d: t[:1] for d, t in saved[1].items()}
        all_ok = True
        for dname in ("bf16", "fp16"):
            for i, case in enumerate(CHECK_SHAPES):
                if args.check_cases is not None and str(i) not in args.check_cases.split(","):
                    continue
                t0 = time.time()
                try:
                    all_ok &= check_case(case, DTYPES[dname], seed=100 + i, published=published, fh=fh)
                except Exception as e:
                    all_ok = False
                    log(f"  {dname} {case}: ERROR {type(e).__name__}: {str(e)[:300]}", fh)
                log(f"  ({time.time() - t0:.1f}s)", fh)
                torch.cuda.empty_cache()
        log(f"== correctness: {'ALL PASS' if all_ok else 'FAILURES'}", fh)
        kernel_module._FWD_TILES, kernel_module._BWD_TILES = saved
        # the autotuners cached the single configs above: forget them so the timing section tunes afresh
        for tuned in (kernel_module._attn_jvp_fwd_kernel_tuned, kernel_module._attn_bwd_dkdv_kernel_tuned,
                      kernel_module._attn_bwd_dq_kernel_tuned):  # fmt: skip
            tuned.cache.clear()

    if args.sweep:
        log("== config sweep", fh)
        sweep = [s for s in BENCH_SHAPES if s[0] in args.sweep.split(",")]
        sweep_configs(sweep, DTYPES[args.dtype], max(50, args.rep_ms // 2), fh)

    if not args.skip_bench:
        log(f"== timing ({args.dtype})", fh)
        deadline = t_start + args.deadline_s

        def write_partial(rows):
            write_outputs(rows, out_dir, header, command, csv_rows=False)

        rows = bench_shapes(shapes, DTYPES[args.dtype], published, args.rep_ms, fh, deadline, write_partial, pins)
        log("== autotuned configs", fh)
        for kname in ("_attn_jvp_fwd_kernel_tuned",):
            for key, cfg in getattr(kernel_module, kname).cache.items():
                log(f"  {kname} {key} -> {cfg}", fh)
        if published is not None:
            for key, cfg in published._attn_fwd.cache.items():
                log(f"  published _attn_fwd {key} -> {cfg}", fh)
        log(write_outputs(rows, out_dir, header, command), fh)
    fh.close()


if __name__ == "__main__":
    main()
