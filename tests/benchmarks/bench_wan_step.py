"""Benchmark of the rCM step on the published Wan2.1-T2V transformer at real size, on one GPU (issue 17, item 6).

A script, not a test. It builds the published Wan2.1-T2V-1.3B transformer config (random weights: timing only)
with the real `diffusers.WanTransformer3DModel` class, directly on the device, wraps it as the project does
(`rcm_core.teachers.wan.WanNet.from_diffusers`), and builds the Distiller the way `scripts/torchrun_rcm.py` does
(`net_copier`: FSDP2 on one rank carrying bf16 mixed precision with the float32 time path, the chosen activation
checkpointing), with bf16 autocast around the losses as the worker's Distiller has on CUDA. Then, at 480p x 81
frames (latent 16 x 21 x 60 x 104 -> 21 x 30 x 52 = 32,760 tokens; text 512 x 4096, CFG 5.0 as the Wan pipeline),
it times
  forward   student(x_t, t, cond) under no_grad;
  JVP       torch.func.jvp of the student in (x_t, t), as sCM runs it (primal + tangent);
  fwd+bwd   student(x_t, t, cond) -> backward;
  rCM step  Distiller.train_step(): critic (fake-score) update, sCM + DMD student update, EMA -- the code the worker
            runs, with critic_ratio = max_rollout_steps = 1 and the exact time derivative.
Each configuration (attention mode x activation checkpointing) is built afresh in the same process (so Triton
tunes each attention shape once); an out-of-memory phase is recorded as "OOM" with the memory it had, not raised.

Attention modes (`--attention`): `fused` (the project's Triton forward+JVP kernel everywhere); `math-jvp` (the
fused kernel in forwards and backwards, PyTorch math attention -- softmax(QK^T)V written out, forward-mode AD
through it -- in the self-attention of the JVP: what the JVP costs without the kernel); `math` (math attention
everywhere, the net's attention_backend="math").

Model FLOPs (B = 1 row; L video tokens, Lc = 512 text tokens, D = heads x head_dim, Ff = ffn_dim, N blocks, patch
1x2x2 over C = 16 channels; a matmul of (m x k) by (k x n) is 2mkn FLOPs; counted once, never recompute):
  per block  self-attn q,k,v,o projections 8 L D^2; cross-attn q,o 4 L D^2 and k,v (text) 4 Lc D^2;
             FFN 4 L D Ff; self-attention QK^T and PV  A_s = 4 L^2 D; cross-attention A_c = 4 L Lc D
  once       patch embedding 2 L (4C) D; output projection 2 L D (4C); text embedder 2 Lc (4096 D + D^2);
             time embedder and time projection 2 (256 D + D^2) + 12 D^2
  Lin_x = linears whose input depends on (x, t) (all but the text side); Lin_c = text embedder + cross k,v
  forward  F = Lin_x + Lin_c + A_s + A_c
  JVP      F + Lin_x + 2 A_s + A_c  (tangent: one GEMM per linear with a tangent input -- the project's one-GEMM
           Linear rule; self-attention tangent Q_t K^T + Q K_t^T and P V_t + H V = 2 A_s; cross-attention keys and
           values are constant along the ODE, so Q_t K^T and H V = A_c)
  backward 2 (Lin_x + Lin_c) + 2.5 (A_s + A_c)   (dX and dW per linear; FlashAttention's 2.5x for attention)
  rCM step sum over the network passes the step makes, counted at run time by hooks on the teacher, student and
           fake-score nets (rows of each call, under grad or not, with forward-mode tangents or not): rows x F for
           every call, + rows x (JVP - F) for a JVP call, + rows x backward for a call under grad. With the
           settings above this is 10 row-forwards (teacher CFG pair = 2 rows, twice; student rollout twice; JVP
           primal; student sCM forward; fake score twice), 1 JVP tangent and 3 backwards (fake score, student sCM
           forward, student rollout); the JSON lists the counted passes.
  MFU = model FLOPs / time / peak, peak = 989 TFLOP/s (H100/H200 SXM dense bf16 spec; --peak-tflops).
The analytic linear FLOPs are cross-checked against torch.utils.flop_counter on one forward (mm, addmm,
convolution); on the CPU, where the math path's attention is visible to the counter too, the attention terms
as well (tests/unit/test_bench_wan_step.py checks both at the tiny size).

`--block-only`: one block of the Wan2.1-T2V-14B config (40 heads x 128, ffn 13824) to project a 14B step on
8 GPUs with Ulysses CP=8. Nets with 1 and 3 blocks are timed (forward, JVP, fwd+bwd); one block = (T3 - T1) / 2,
the rest of the net (embeddings, output) = T1 - one block. Token settings: all 32,760 tokens on one GPU, and one
rank's share under CP=8: 4,095 tokens (latent 16 x 21 x 30 x 26) for the projections, FFN and cross-attention,
and self-attention over all 32,760 tokens for 40 / 8 = 5 heads (the shape after Ulysses' all-to-all, emulated by
a reshape on one GPU; the collective itself is estimated, not run). Projection written to the output:
  T_step(14B, CP=8) = sum over pass kinds k of n_k x [40 x t_block,k + t_rest,k + 40 x V_k / BW]
with n_k the row-passes of the measured 1.3B step (forward, JVP, backward), t_block,k / t_rest,k per rank, V_k the
all-to-all bytes one rank sends per block (q, k, v and o: 4 tensors of L/8 x D bf16, 7/8 of each leaves the rank;
twice that in a JVP, which carries tangents, and in a backward under full checkpointing, which recomputes), BW
the per-GPU all-to-all bandwidth assumed (--a2a-gbs, default 450 GB/s: NVLink 4's 18 links x 25 GB/s per
direction, a spec peak, so the estimate is optimistic); the FSDP weight all-gathers and gradient reduce-scatters
are listed separately (overlappable with compute). With --passes-from a 14B torchrun run (`--model 14B
--cp-degree 8`), the projection sits next to the measured step.

    PYTHONPATH=. python tests/benchmarks/bench_wan_step.py --out runs/wan [--activation-checkpoint full,selective]
        [--attention fused,math-jvp] [--phases forward,jvp,fwd_bwd,step]
    PYTHONPATH=. python tests/benchmarks/bench_wan_step.py --out runs/wan --block-only
    PYTHONPATH=. python tests/benchmarks/bench_wan_step.py --tiny --out runs/wan_tiny   # CPU smoke check

Wan2.1 config source: docs/design/diffusers_teachers.md section 1.12 (diffusers' scripts/convert_wan_to_diffusers.py,
"Wan-T2V-1.3B" / "Wan-T2V-14B", matching the published Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import re
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.autograd import forward_ad
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rcm_core.config import DistillConfig, LossConfig, TeacherConfig, TrainConfig  # noqa: E402
from rcm_core.distill import Distiller  # noqa: E402
from rcm_core.models.attention import attention_math  # noqa: E402
from rcm_core.models.flow import FlowModel  # noqa: E402
from rcm_core.parallel.parallel_dims import ParallelConfig, ParallelDims  # noqa: E402
from rcm_core.parallel.parallelize import net_copier  # noqa: E402

PEAK_TFLOPS = 989.0  # dense bf16 tensor-core peak, H100/H200 SXM (spec)
A2A_GBS = 450.0  # assumed per-GPU all-to-all bandwidth, GB/s per direction (NVLink 4 spec: 18 x 25 GB/s)
CP_DEGREE = 8
# diffusers WanTransformer3DModel kwargs (docs/design/diffusers_teachers.md 1.12)
_WAN_COMMON = dict(
    patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)  # fmt: skip
WAN_CONFIGS = {
    "1.3B": {**_WAN_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "14B": {**_WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
    # CPU smoke check: same classes and code path, 2 blocks of width 32 (head dim 16: RoPE t/h/w split 8/4/4)
    "tiny": {**_WAN_COMMON, "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
             "text_dim": 32, "freq_dim": 16, "ffn_dim": 64, "num_layers": 2},
}  # fmt: skip
LATENT_480P_81F = (16, 21, 60, 104)  # Wan VAE: 81 frames -> 1 + 80/4 = 21 latent frames; 480 x 832 / 8
LATENT_CP8_RANK = (16, 21, 30, 26)  # 21 x 15 x 13 = 4,095 tokens = 32,760 / 8
TEXT_LEN = 512  # the Wan pipeline pads umT5 embeddings to 512 tokens
TINY_LATENT, TINY_TEXT = (4, 3, 8, 8), 8
LINEAR_OPS = ("aten.mm", "aten.addmm", "aten.convolution")
ATTENTION_OPS = ("aten.bmm", "aten.baddbmm")


# ------------------------------------------------------------------------------------------------- data
class RandomLatentTask:
    """Video latents x0 (B, C, F, H, W) ~ N(0, 1) and text conditions as the Wan pipeline hands them over.

    cond = {"tokens": (B, Lc, D_text), "mask": (B, Lc) bool}: a prompt of Lc / 4 real tokens, zero-padded to Lc;
    the null condition (the pipeline's empty negative prompt) is all zeros with one real token. The cost of a
    network call does not depend on the values.
    """

    def __init__(self, *, latent: tuple[int, ...], text_len: int, text_dim: int, device: torch.device):
        self.sample_shape = tuple(latent)
        self.text_len, self.text_dim, self.device = text_len, text_dim, device

    def _mask(self, batch_size: int, real: int) -> torch.Tensor:
        return (torch.arange(self.text_len, device=self.device) < real).expand(batch_size, -1)

    def sample_cond(self, batch_size: int, *, generator: torch.Generator | None = None) -> dict:
        shape = (batch_size, self.text_len, self.text_dim)
        mask = self._mask(batch_size, max(1, self.text_len // 4))
        tokens = torch.randn(shape, generator=generator, device=self.device) * mask[..., None]
        return {"tokens": tokens, "mask": mask}

    def sample(self, batch_size: int, *, generator: torch.Generator | None = None):
        cond = self.sample_cond(batch_size, generator=generator)
        return torch.randn((batch_size, *self.sample_shape), generator=generator, device=self.device), cond

    def null_cond(self, batch_size: int) -> dict:
        tokens = torch.zeros((batch_size, self.text_len, self.text_dim), device=self.device)
        return {"tokens": tokens, "mask": self._mask(batch_size, 1)}


# ------------------------------------------------------------------------------------------------- FLOPs
def tokens_of(config: dict, latent: tuple[int, ...]) -> int:
    pt, ph, pw = config["patch_size"]
    return (latent[1] // pt) * (latent[2] // ph) * (latent[3] // pw)


def wan_flops(config: dict, tokens: int, text_len: int, num_layers: int | None = None) -> dict[str, float]:
    """Analytic model FLOPs of one row (see the module docstring): lin_x, lin_c, attn_self, attn_cross."""
    n = config["num_layers"] if num_layers is None else num_layers
    d = config["num_attention_heads"] * config["attention_head_dim"]
    ff, lt, lc = config["ffn_dim"], tokens, text_len
    patch = math.prod(config["patch_size"])
    per_block_x = 8 * lt * d * d + 4 * lt * d * d + 4 * lt * d * ff  # self q,k,v,o; cross q,o; FFN
    per_block_c = 4 * lc * d * d  # cross-attention k, v of the text
    embed_x = 2 * lt * config["in_channels"] * patch * d + 2 * lt * d * config["out_channels"] * patch
    time_path = 2 * (config["freq_dim"] * d + d * d) + 2 * d * 6 * d  # time embedder MLP, time projection
    text = 2 * lc * (config["text_dim"] * d + d * d)  # text embedder MLP
    return {
        "lin_x": float(n * per_block_x + embed_x + time_path),
        "lin_c": float(n * per_block_c + text),
        "attn_self": float(n * 4 * lt * lt * d),
        "attn_cross": float(n * 4 * lt * lc * d),
    }


def phase_flops(f: dict[str, float]) -> dict[str, float]:
    """Model FLOPs of one row's forward, JVP (primal + tangent), backward, forward + backward."""
    lin, attn = f["lin_x"] + f["lin_c"], f["attn_self"] + f["attn_cross"]
    forward = lin + attn
    jvp = forward + f["lin_x"] + 2 * f["attn_self"] + f["attn_cross"]
    backward = 2 * lin + 2.5 * attn
    return {"forward": forward, "jvp": jvp, "backward": backward, "fwd_bwd": forward + backward}


def step_flops(passes: list[dict], per_row: dict[str, float]) -> float:
    """Model FLOPs of one rCM step from its counted network passes."""
    total = 0.0
    for p in passes:
        total += p["rows"] * (per_row["jvp"] if p["jvp"] else per_row["forward"])
        total += p["rows"] * per_row["backward"] if p["grad"] else 0.0
    return total


def counted_flops(fn) -> dict[str, float]:
    """FLOPs of one call of fn by op, as torch.utils.flop_counter sees them: linear (mm, addmm, conv), attention
    (bmm: the math path's QK^T and PV; the Triton kernel is invisible to the counter)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op): float(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {
        "linear": sum(v for k, v in by_op.items() if k in LINEAR_OPS),
        "attention": sum(v for k, v in by_op.items() if k in ATTENTION_OPS),
        "all": sum(by_op.values()),
    }


# ------------------------------------------------------------------------------------------------- setup
def init_process(device: str) -> torch.device:
    """The process group: torchrun's (WORLD_SIZE > 1: one GPU per local rank), else a one-rank group, so the
    networks go through FSDP2 (mixed precision) as on N ranks."""
    if dist.is_initialized():
        pass
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device == "cuda":
            local = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if device == "cuda":
            torch.cuda.set_device(0)
            dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
        else:
            dist.init_process_group("gloo")
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def say(*args, **kwargs) -> None:
    if rank0():
        print(*args, **kwargs)


def build_wan_net(config: dict, device: torch.device | str, attention_backend: str):
    """The project's WanNet over a randomly initialised diffusers WanTransformer3DModel, built on `device`.

    On a GPU it is built directly there (every tensor allocated once, no CPU copy) and the Distiller copies it
    the way the worker does (net_copier). On `meta` (several ranks) nothing is allocated: `meta_copier` then
    materialises each rank's shards only. WanNet computes its RoPE tables per forward, so no buffer of the
    diffusers module (its non-persistent `rope` tables are not adopted) needs a value.
    """
    from diffusers import WanTransformer3DModel

    from rcm_core.teachers.wan import WanNet

    with torch.device(device):
        model = WanTransformer3DModel(**config)  # float32: FSDP's mixed precision gathers bf16 copies
    return WanNet.from_diffusers(model, attention_backend=attention_backend)


def meta_copier(*, parallel_dims: ParallelDims, config: ParallelConfig, device: torch.device):
    """copy_net for a net on `meta`: copy, parallelize, `to_empty` on the device (this rank's shards only), random
    weights. The torchtitan recipe `build_parallel_dit` follows; net_copier would first put a whole float32 copy
    of the net on every rank (57 GB for 14B, per copy). Random, not copied, weights: the step's cost does not
    depend on them (norm weights 1, biases 0, the rest N(0, 0.02))."""
    import copy

    from rcm_core.parallel.parallelize import parallelize_net

    copies = iter(range(1000))

    def copy_net(net: torch.nn.Module) -> torch.nn.Module:
        model = parallelize_net(copy.deepcopy(net), parallel_dims=parallel_dims, config=config)
        model.to_empty(device=device)
        gen = torch.Generator(device=device).manual_seed(1000 * next(copies) + dist.get_rank())
        with torch.no_grad():
            for name, p in model.named_parameters():
                local = p.to_local() if hasattr(p, "to_local") else p  # the rank's shard of a DTensor
                if name.endswith("bias"):
                    local.zero_()
                elif "norm" in name:
                    local.fill_(1.0)
                else:
                    local.normal_(0.0, 0.02, generator=gen)
        return model

    return copy_net


def math_attention_in_jvp(net) -> None:
    """Self-attention runs PyTorch math attention when its inputs carry forward-mode tangents (the JVP), and the
    net's own core otherwise (forwards, backwards)."""
    for sa in net.self_attentions():
        core = sa.core_attention

        def dispatch(q, k, v, key_padding_mask=None, _core=core):
            if forward_ad.unpack_dual(q).tangent is not None:
                return attention_math(q, k, v, key_padding_mask)
            return _core(q, k, v, key_padding_mask)

        sa.core_attention = dispatch


def emulate_ulysses(net, cp: int) -> None:
    """Each self-attention runs on the shape one rank sees after Ulysses' all-to-all: heads / cp heads over all
    L x cp tokens (a reshape on one GPU; the collective's time is estimated separately)."""
    for sa in net.self_attentions():
        core = sa.core_attention

        def ulysses_shape(q, k, v, key_padding_mask=None, _core=core):
            b, h, n, d = q.shape  # (B, H, L / cp, Dh) on one rank

            def a2a(x):
                return x.reshape(b, h // cp, n * cp, d)  # (B, H / cp, L, Dh)

            return _core(a2a(q), a2a(k), a2a(v), None).reshape(b, h, n, d)

        sa.core_attention = ulysses_shape


def inner_net(model: FlowModel):
    return model.net


class PassCounter:
    """Records every call of the teacher / student / fake-score nets: rows, under grad, with tangents."""

    def __init__(self, nets: dict[str, torch.nn.Module]):
        self.passes: list[dict] = []
        self.enabled = False
        # prepend: before the batch-sharding hook (rcm_core.parallel.fsdp), so rows are the global batch's on every
        # rank (the step's model FLOPs are then split over all ranks, data- and context-parallel alike)
        self.handles = [net.register_forward_pre_hook(self._hook(name), prepend=True) for name, net in nets.items()]

    def _hook(self, name: str):
        def hook(module, args):
            if self.enabled:
                x = args[0]
                jvp = forward_ad.unpack_dual(x).tangent is not None
                self.passes.append({"net": name, "rows": int(x.shape[0]), "grad": torch.is_grad_enabled(), "jvp": jvp})

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def time_fn(fn, device: torch.device, reps: int, warmup: int) -> dict:
    """Median seconds of `reps` calls after `warmup` calls (autotuning, allocator), and the peak memory."""
    for _ in range(warmup):
        fn()
    sync(device)
    reset_peak(device)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"s": statistics.median(times), "all_s": times, "peak_gib": peak_gib(device)}


def oom_record(exc: BaseException, device: torch.device) -> dict:
    """What an out-of-memory error had: the allocation it asked for, PyTorch's allocated memory, the card."""
    msg = str(exc)
    out: dict = {"oom": True, "peak_gib": round(peak_gib(device), 2)}
    for key, pattern in (("tried_gib", r"Tried to allocate ([\d.]+) ([GM]iB)"),
                         ("allocated_gib", r"([\d.]+) ([GM]iB) is allocated by PyTorch"),
                         ("capacity_gib", r"total capacity of ([\d.]+) ([GM]iB)")):  # fmt: skip
        m = re.search(pattern, msg)
        if m:
            out[key] = round(float(m.group(1)) / (1024 if m.group(2) == "MiB" else 1), 2)
    out["message"] = msg.split("\n")[0][:300]
    return out


KEEP_GOING = False  # main() sets it on CUDA: record a failed phase and go on (CPU runs and tests fail loudly)


def error_record(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}


def oom_text(r: dict) -> str:
    at = r.get("allocated_gib", r["peak_gib"])
    tried = f", asking {r['tried_gib']:.1f} GiB more" if "tried_gib" in r else ""
    return f"OOM at {at:.1f} GiB{tried}"


def run_phase(name: str, fn, device: torch.device, reps: int, warmup: int, model_flops: float, peak: float | None):
    try:
        t = time_fn(fn, device, reps, warmup)
        if world() > 1:  # the largest over ranks; every rank times the same collective-bound step
            peak_t = torch.tensor([t["peak_gib"]], device=device)
            dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
            t["peak_gib"] = float(peak_t.item())
    except torch.OutOfMemoryError as exc:  # record and go on: the next phase / configuration may fit
        rec = oom_record(exc, device)
        say(f"  {name:9s} {oom_text(rec)}", flush=True)
        return rec
    except Exception as exc:  # noqa: BLE001 -- on a GPU a failed phase (e.g. after an OOM) must not end the run
        if not KEEP_GOING:
            raise
        rec = error_record(exc)
        say(f"  {name:9s} {rec['error']}", flush=True)
        return rec
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model_flops /= world()  # per GPU: the ranks share one sample's work (CP) or the batch
    tflops = model_flops / t["s"] / 1e12
    rec = {"ms": round(t["s"] * 1e3, 2), "all_ms": [round(s * 1e3, 2) for s in t["all_s"]],
           "peak_gib": round(t["peak_gib"], 3), "model_tflop": model_flops / 1e12, "tflops": tflops,
           "mfu": None if peak is None else tflops / peak}  # fmt: skip
    mfu = "" if peak is None else f"  MFU {tflops / peak:6.1%}"
    say(f"  {name:9s} {t['s'] * 1e3:10.1f} ms  {tflops:8.3f} TFLOP/s{mfu}  peak {t['peak_gib']:7.2f} GiB", flush=True)
    return rec


# ------------------------------------------------------------------------------------------------- full step
def phase_fns(
    model: FlowModel, task: RandomLatentTask, device: torch.device, autocast: bool = False, batch_size: int = 1
) -> dict:
    """forward / JVP / fwd+bwd of `model` on `batch_size` samples drawn from `task` at TrigFlow time 0.7 (under bf16
    autocast when the Distiller's losses run under it)."""
    gen = torch.Generator(device=device).manual_seed(1)
    x0, cond = task.sample(batch_size, generator=gen)
    x_t = torch.randn(x0.shape, generator=gen, device=device)
    v = torch.randn(x0.shape, generator=gen, device=device)
    t = torch.full((batch_size,), 0.7, device=device)  # TrigFlow time, float32 as the Distiller draws it

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)

    def forward():
        with torch.no_grad(), amp():
            return model(x_t, t, cond)

    def jvp():  # as sCM runs it: tangents (dx_t/dt, 1) in (x_t, t)
        with torch.no_grad(), amp():
            return torch.func.jvp(lambda x, tt: model(x, tt, cond), (x_t, t), (v, torch.ones_like(t)))

    def fwd_bwd():
        with amp():
            loss = model(x_t, t, cond).float().square().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return {"forward": forward, "jvp": jvp, "fwd_bwd": fwd_bwd}


def mixed_precision(args, device: torch.device) -> str:
    """FSDP2's mixed precision: bf16 blocks with the float32 time path on CUDA (as torchrun_rcm.py), else none."""
    if args.mixed_precision != "auto":
        return args.mixed_precision
    return "bfloat16" if device.type == "cuda" else "none"


def autocast_on(args, device: torch.device) -> bool:
    """bf16 autocast around the losses: on CUDA by default, as the worker's Distiller (rcm_core.pipeline)."""
    return args.autocast == "on" or (args.autocast == "auto" and device.type == "cuda")


def build_distiller(
    args, config: dict, device: torch.device, attention: str, ac: str, task: RandomLatentTask, batch_size: int = 1
):
    """The Distiller as the worker builds it on CUDA (rcm_core.pipeline.build_distiller: bf16 autocast around the
    losses) with the networks copied as scripts/torchrun_rcm.py does (net_copier: FSDP2, bf16 mixed precision).
    batch_size is the global batch (a multiple of world_size / cp_degree, the data-parallel degree)."""
    from rcm_core.teachers import FAMILIES

    mixed = mixed_precision(args, device)
    pconfig = ParallelConfig(activation_checkpointing=ac, mixed_precision=mixed, cp_degree=args.cp_degree)
    dims = ParallelDims.from_config(pconfig, dist.get_world_size())
    dims.build_mesh(device.type)
    wan = FAMILIES["wan2.1"]
    dconfig = DistillConfig(
        loss=LossConfig(critic_ratio=1, max_rollout_steps=1, dmd_weight=0.01),
        teacher=TeacherConfig(guidance_scale=wan.guidance_to_project(wan.default_guidance)),
        train=TrainConfig(steps=1000, batch_size=batch_size, seed=0, log_every=1, eval_every=0),
    )
    backend = "math" if attention == "math" else "auto"
    if dims.world_size > 1:  # each rank materialises only its shards
        net = build_wan_net(config, "meta", backend)
        copy_net = meta_copier(parallel_dims=dims, config=pconfig, device=device)
    else:  # the worker's path: one net with weights, copied by net_copier
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            net = build_wan_net(config, device, backend)
        copy_net = net_copier(parallel_dims=dims, config=pconfig, device=device)
    amp = autocast_on(args, device)
    distiller = Distiller(dconfig, net, task, parameterization="rf", copy_net=copy_net, device=device, autocast=amp)
    del net  # the four copies (teacher, student, EMA, fake score) are all the step needs
    if attention == "math-jvp":
        math_attention_in_jvp(inner_net(distiller.student))
    return distiller, pconfig


def guarded(fn, device: torch.device, what: str) -> dict | None:
    """None when fn() ran; else the record of its OOM (or, on CUDA, of another error), printed as `what`."""
    try:
        fn()
        return None
    except torch.OutOfMemoryError as exc:
        rec = oom_record(exc, device)
        say(f"  {what:9s} {oom_text(rec)}", flush=True)
    except Exception as exc:  # noqa: BLE001 -- as in run_phase
        if not KEEP_GOING:
            raise
        rec = error_record(exc)
        say(f"  {what:9s} {rec['error']}", flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def count_flops(row: dict, fns: dict, flops: dict[str, float]) -> None:
    """FlopCounterMode's count of one forward and one JVP against the formula, into row (module doc)."""
    counted = counted_flops(fns["forward"])
    row["flopcounter_forward"] = counted
    row["flopcounter_linear_over_analytic"] = counted["linear"] / (flops["lin_x"] + flops["lin_c"])
    if counted["attention"]:  # math path only (the Triton kernel is invisible to the counter)
        row["flopcounter_attention_over_analytic"] = counted["attention"] / (flops["attn_self"] + flops["attn_cross"])
    counted_jvp = counted_flops(fns["jvp"])
    row["flopcounter_jvp"] = counted_jvp
    # the JVP's linears: 2 Lin_x + Lin_c when the one-GEMM rule holds (3 Lin_x + Lin_c with PyTorch's addmm rule)
    row["flopcounter_jvp_linear_over_analytic"] = counted_jvp["linear"] / (2 * flops["lin_x"] + flops["lin_c"])
    if counted_jvp["attention"]:
        # math path only. It executes 3 A_s + 3 A_c: PyTorch's bmm forward-AD rule also multiplies the text keys'
        # and values' zero tangents, the A_c the model FLOPs (3 A_s + 2 A_c) leave out
        executed = 3 * flops["attn_self"] + 3 * flops["attn_cross"]
        row["flopcounter_jvp_attention_over_executed"] = counted_jvp["attention"] / executed


def bench_config(args, config: dict, device: torch.device, attention: str, ac: str, row: dict, save) -> None:
    """One configuration, filled into `row` (save() after every phase, so a run cut short keeps what it measured):
    build, count FLOPs, time the phases and the rCM step; OOMs are recorded, not raised."""
    latent, text_len = (TINY_LATENT, TINY_TEXT) if args.tiny else (tuple(args.latent), args.text_len)
    tokens = tokens_of(config, latent)
    task = RandomLatentTask(latent=latent, text_len=text_len, text_dim=config["text_dim"], device=device)
    row.update(model=args.model, attention=attention, activation_checkpointing=ac, latent=list(latent), tokens=tokens,
               text_len=text_len, world_size=dist.get_world_size(), cp_degree=args.cp_degree)  # fmt: skip
    say(f"== {args.model} attention={attention} ac={ac} latent={latent} ({tokens} tokens)", flush=True)
    built: list = []
    failed = guarded(lambda: built.append(build_distiller(args, config, device, attention, ac, task)), device, "build")
    if failed:
        row["build"] = failed
        save()
        return
    distiller, pconfig = built.pop()
    row["mixed_precision"], row["autocast"] = pconfig.mixed_precision, distiller.autocast
    student = distiller.student
    row["params_b"] = sum(p.numel() for p in student.parameters()) / 1e9
    fns = phase_fns(student, task, device, autocast=distiller.autocast)
    flops = wan_flops(config, tokens, text_len)
    per_row = phase_flops(flops)
    row["flops_per_row"] = {**flops, **per_row}
    peak = args.peak_tflops if (device.type == "cuda" or args.peak_tflops_cpu) else None
    # a forward first, as the critic rollout runs before sCM's JVP (rcm_core.parallel.fsdp: one-rank FSDP units)
    failed = guarded(fns["forward"], device, "forward")
    if failed:
        row["forward"] = failed
    elif dist.get_world_size() == 1:  # one rank's counter would see its share only: checked on one rank
        failed = guarded(lambda: count_flops(row, fns, flops), device, "jvp")
        if failed and failed.get("oom"):  # the forward was counted: the JVP ran out of memory (math attention)
            row["jvp"] = failed
        elif failed:  # the counter, not the JVP, may be what failed: the JVP phase still runs
            row["flopcounter_error"] = failed["error"]
    save()
    reps, warmup = (args.reps, 1) if device.type == "cuda" else (1, 1)
    phases = [p for p in args.phases.split(",") if p]
    for name, fn in fns.items():
        if name in phases and name not in row:
            row[name] = run_phase(name, fn, device, reps, warmup, per_row[name], peak)
            save()
    if "step" in phases:
        counter = PassCounter({n: inner_net(getattr(distiller, n)) for n in ("teacher", "student", "fake")})
        counter.enabled = True
        # the warm-up step (autotuning) is also the one whose passes are counted
        failed = guarded(lambda: (distiller.train_step(), sync(device)), device, "step")
        counter.enabled = False
        counter.remove()
        row["step_passes"] = counter.passes
        if failed:
            row["step"] = failed
        else:
            row["step_flops"] = step_flops(counter.passes, per_row)
            row["step"] = run_phase("step", distiller.train_step, device, args.steps, 0, row["step_flops"], peak)
        save()


# ------------------------------------------------------------------------------------------------- 14B block
def bench_block(args, device: torch.device, out: dict, save) -> None:
    """Per-block and rest-of-net times of the 14B config, all tokens and one CP=8 rank's share (module doc)."""
    base = WAN_CONFIGS["tiny" if args.tiny else "14B"]
    full_latent, text_len = (TINY_LATENT, TINY_TEXT) if args.tiny else (LATENT_480P_81F, args.text_len)
    # tiny: 2 heads, so a 2-way split stands in for CP=8 (the same code path)
    cp = 2 if args.tiny else CP_DEGREE
    rank_latent = (
        (full_latent[0], full_latent[1], full_latent[2] // cp, full_latent[3]) if args.tiny else LATENT_CP8_RANK
    )
    # the rank's share first: the projection needs it, so a run cut short still has it
    settings = {f"cp{cp}_rank": (rank_latent, cp), "all_tokens": (full_latent, 1)}
    depths = (1, 3)
    mixed = mixed_precision(args, device)
    pconfig = ParallelConfig(activation_checkpointing=args.activation_checkpoint.split(",")[0], mixed_precision=mixed)
    dims = ParallelDims.from_config(pconfig, dist.get_world_size())
    dims.build_mesh(device.type)
    copy_net = net_copier(parallel_dims=dims, config=pconfig, device=device)
    reps, warmup = (args.reps, 1) if device.type == "cuda" else (1, 1)
    peak = args.peak_tflops if (device.type == "cuda" or args.peak_tflops_cpu) else None
    out.update(config="tiny" if args.tiny else "14B", cp_degree=cp, text_len=text_len,
               activation_checkpointing=pconfig.activation_checkpointing, settings={})  # fmt: skip
    for setting, (latent, split) in settings.items():
        tokens_rank = tokens_of(base, latent)
        res: dict = {"latent": list(latent), "tokens_rank": tokens_rank, "self_attention_tokens": tokens_rank * split,
                     "self_attention_heads": base["num_attention_heads"] // split, "depths": {},
                     "params": {}}  # fmt: skip
        out["settings"][setting] = res
        for depth in depths:
            cfg = {**base, "num_layers": depth}
            say(f"== block-only {out['config']} {setting}: {depth} block(s), latent {latent}", flush=True)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(0)
                net = build_wan_net(cfg, device, "auto")
            res["params"][depth] = sum(p.numel() for p in net.parameters())
            model = FlowModel(copy_net(net), "rf").train().requires_grad_(True)
            del net
            if split > 1:
                emulate_ulysses(model.net, split)
            task = RandomLatentTask(latent=latent, text_len=text_len, text_dim=base["text_dim"], device=device)
            fns = phase_fns(model, task, device, autocast=autocast_on(args, device))
            # per-rank model FLOPs: token-wise terms at the rank's tokens, self-attention for its heads over all
            flops = wan_flops(cfg, tokens_rank, text_len)
            flops["attn_self"] = (
                depth
                * 4
                * (tokens_rank * split) ** 2
                * cfg["attention_head_dim"]
                * (cfg["num_attention_heads"] // split)
            )
            per_row = phase_flops(flops)
            res["depths"][depth] = {}
            failed = guarded(fns["forward"], device, "forward")  # FSDP one-rank units: a forward before the JVP
            for name, fn in fns.items() if failed is None else ():
                res["depths"][depth][name] = run_phase(name, fn, device, reps, warmup, per_row[name], peak)
                save()
            if failed:
                res["depths"][depth] = {"forward": failed}
            del model, fns
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        res.update(block_split(res["depths"], depths))
        save()


def block_split(by_depth: dict, depths: tuple[int, int]) -> dict:
    """ms of one block and of the rest of the net per phase, from nets of depths (d1, d2); None if one OOMed."""
    d1, d2 = depths
    block, rest = {}, {}
    for phase in ("forward", "jvp", "fwd_bwd"):
        a, b = by_depth[d1].get(phase, {}), by_depth[d2].get(phase, {})
        if "ms" not in a or "ms" not in b:
            block[phase] = rest[phase] = None
            continue
        block[phase] = (b["ms"] - a["ms"]) / (d2 - d1)
        rest[phase] = a["ms"] - d1 * block[phase]
    return {"block_ms": block, "rest_ms": rest}


def projection_cp(block: dict, passes: list[dict] | None, a2a_gbs: float) -> dict:
    """T_step of the whole net (14B; tiny in the smoke check) under CP, from one rank's block / rest times and the
    counted passes of a measured rCM step (module doc). Estimated from measurements, not measured itself."""
    if "config" not in block:
        return {"note": "no block timings yet"}
    cfg, cp = WAN_CONFIGS[block["config"]], block["cp_degree"]
    setting = block.get("settings", {}).get(f"cp{cp}_rank")
    if passes is None or setting is None or any(v is None for v in setting.get("block_ms", {None: None}).values()):
        return {"note": "needs the rank's block timings (no OOM) and a step's counted passes (--passes-from)"}
    n = cfg["num_layers"]
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    tokens = setting["self_attention_tokens"]  # all of the sample's tokens
    # one all-to-all: a (L / cp, D) bf16 tensor per rank, (cp - 1) / cp of it leaves the rank
    a2a_bytes = tokens / cp * d * 2 * (cp - 1) / cp
    fwd_rows = sum(p["rows"] for p in passes if not p["jvp"])
    jvp_rows = sum(p["rows"] for p in passes if p["jvp"])
    bwd_rows = sum(p["rows"] for p in passes if p["grad"])
    bl, rest = setting["block_ms"], setting["rest_ms"]
    per_row_ms = {
        "forward": n * bl["forward"] + rest["forward"],
        "jvp": n * bl["jvp"] + rest["jvp"],
        "backward": n * (bl["fwd_bwd"] - bl["forward"]) + rest["fwd_bwd"] - rest["forward"],
    }
    compute_ms = fwd_rows * per_row_ms["forward"] + jvp_rows * per_row_ms["jvp"] + bwd_rows * per_row_ms["backward"]
    # q, k, v, o per forward, and their tangents in a JVP; a backward moves the four gradients, and under full
    # checkpointing first repeats the forward's four in its recompute (selective keeps the attention outside)
    bwd_a2a = 8 if block["activation_checkpointing"] == "full" else 4
    a2a_calls = n * (4 * fwd_rows + 8 * jvp_rows + bwd_a2a * bwd_rows)
    a2a_ms = a2a_calls * a2a_bytes / (a2a_gbs * 1e9) * 1e3
    # parameters of the whole net from the 1- and 3-block nets: rest + n blocks
    p1, p3 = (setting["params"][k] for k in sorted(setting["params"]))
    params = p1 + (n - 1) * (p3 - p1) / 2
    # FSDP over the cp ranks: every net call gathers the bf16 weights, every backward re-gathers them and
    # reduce-scatters float32 gradients; (cp - 1) / cp of each crosses the links
    calls, backwards = len(passes), sum(1 for p in passes if p["grad"])
    gather_ms = (calls + backwards) * params * 2 * (cp - 1) / cp / (a2a_gbs * 1e9) * 1e3
    reduce_ms = backwards * params * 4 * (cp - 1) / cp / (a2a_gbs * 1e9) * 1e3
    return {
        "formula": f"T = n_fwd * T_fwd + n_jvp * T_jvp + n_bwd * T_bwd + all-to-all; T_k = {n} * t_block_k + t_rest_k "
        f"(one rank, measured); all-to-all = {n} blocks x (4 n_fwd + 8 n_jvp + {bwd_a2a} n_bwd) calls x bytes / BW",
        "config": block["config"],
        "cp_degree": cp,
        "params": params,
        "row_passes": {"forward": fwd_rows, "jvp": jvp_rows, "backward": bwd_rows},
        "per_row_ms": per_row_ms,
        "a2a_gbs_assumed": a2a_gbs,
        "a2a_bytes_per_call": a2a_bytes,
        "a2a_calls": a2a_calls,
        "compute_s": compute_ms / 1e3,
        "a2a_s": a2a_ms / 1e3,
        "step_s": (compute_ms + a2a_ms) / 1e3,
        "fsdp_allgather_s_if_not_overlapped": gather_ms / 1e3,
        "fsdp_reduce_scatter_s_if_not_overlapped": reduce_ms / 1e3,
    }


# ------------------------------------------------------------------------------------------------- output
def fmt_phase(r: dict | None) -> str:
    if not r:
        return ""
    if "error" in r:
        return r["error"][:60]
    if r.get("oom"):
        return oom_text(r)
    mfu = "" if r.get("mfu") is None else f", {r['mfu']:.1%} MFU"
    return f"{r['ms']:.1f} ms{mfu}"


def step_table(rows: list[dict]) -> str:
    lines = ["| model | attention | AC | tokens | forward | JVP | fwd+bwd | rCM step | step TFLOP/s | step peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        s = r.get("step") or {}
        tf = "" if "tflops" not in s else f"{s['tflops']:.1f}"
        pk = "" if "peak_gib" not in s or s.get("oom") else f"{s['peak_gib']:.1f}"
        build = f" (build: {fmt_phase(r['build'])})" if "build" in r else ""
        jvp = fmt_phase(r.get("jvp"))
        f, j = r.get("forward") or {}, r.get("jvp") or {}
        if "ms" in f and "ms" in j:  # the JVP in forwards, against its FLOP floor (JVP / forward model FLOPs)
            fl = r["flops_per_row"]
            jvp += f" = {j['ms'] / f['ms']:.2f}x fwd (floor {fl['jvp'] / fl['forward']:.2f}x)"
        gpus = f" on {r['world_size']} ranks, CP={r['cp_degree']}" if r.get("world_size", 1) > 1 else ""
        lines.append(f"| Wan2.1 {r['model']}{gpus}{build} | {r['attention']} | {r['activation_checkpointing']} | "
                     f"{r['tokens']} | {fmt_phase(r.get('forward'))} | {jvp} | "
                     f"{fmt_phase(r.get('fwd_bwd'))} | {fmt_phase(s)} | {tf} | {pk} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def block_table(block: dict) -> str:
    lines = ["| setting | self-attention | depth | forward | JVP | fwd+bwd |", "|---|---|---|---|---|---|"]
    for name, s in block["settings"].items():
        attn = f"{s['self_attention_heads']} heads x {s['self_attention_tokens']} tokens"
        for depth, rec in s["depths"].items():
            lines.append(f"| {name} ({s['tokens_rank']} tokens) | {attn} | {depth} | {fmt_phase(rec.get('forward'))} | "
                         f"{fmt_phase(rec.get('jvp'))} | {fmt_phase(rec.get('fwd_bwd'))} |")  # fmt: skip
        if "block_ms" not in s:  # cut short before both depths ran
            continue
        bl = s["block_ms"]
        cells = " | ".join("" if bl[p] is None else f"{bl[p]:.2f} ms" for p in ("forward", "jvp", "fwd_bwd"))
        lines.append(f"| {name}: one block | | | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/wan_bench"))
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda, cpu with --tiny")
    ap.add_argument("--tiny", action="store_true", help="a 2-block width-32 Wan on 48 tokens, float32 (smoke check)")
    ap.add_argument("--model", choices=["1.3B", "14B"], default="1.3B", help="the full-step config")
    ap.add_argument("--latent", type=int, nargs=4, default=list(LATENT_480P_81F), metavar=("C", "F", "H", "W"))
    ap.add_argument("--text-len", type=int, default=TEXT_LEN)
    ap.add_argument("--attention", default="fused", help="comma-separated of fused, math-jvp, math")
    ap.add_argument("--activation-checkpoint", default="full", help="comma-separated of none, selective, full")
    ap.add_argument("--phases", default="forward,jvp,fwd_bwd,step")
    ap.add_argument(
        "--mixed-precision",
        choices=["auto", "none", "bfloat16"],
        default="auto",
        help="auto: bfloat16 on CUDA, none on a CPU (bfloat16 there checks the GPU's precision path)",
    )
    ap.add_argument(
        "--autocast",
        choices=["auto", "on", "off"],
        default="auto",
        help="bf16 autocast around the losses and phases; auto: on CUDA (as the worker), off on a CPU",
    )
    ap.add_argument("--reps", type=int, default=3, help="timed calls of forward / JVP / fwd+bwd (median)")
    ap.add_argument("--steps", type=int, default=2, help="timed rCM steps (median), after one warm-up step")
    ap.add_argument("--cp-degree", type=int, default=1, help="under torchrun: ranks splitting each sample's tokens")
    ap.add_argument("--block-only", action="store_true", help="one 14B block, all tokens and one CP=8 rank's share")
    ap.add_argument("--passes-from", type=Path, default=None, help="a wan_step*.json whose counted passes project 14B")
    ap.add_argument("--a2a-gbs", type=float, default=A2A_GBS, help="assumed all-to-all bandwidth, GB/s per GPU")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    ap.add_argument("--peak-tflops-cpu", action="store_true", help="also compute MFU on a CPU (against --peak-tflops)")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    # before CUDA starts: segments that grow in place fragment less across the configurations built in turn
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = init_process(args.device or ("cpu" if args.tiny else "cuda"))
    global KEEP_GOING
    KEEP_GOING = device.type == "cuda"
    if args.tiny:
        args.model = "tiny"
    args.out.mkdir(parents=True, exist_ok=True)
    import diffusers

    with_mfu = device.type == "cuda" or args.peak_tflops_cpu
    header = {"date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "diffusers": diffusers.__version__, "label": args.label,
              "argv": sys.argv[1:], "peak_tflops": args.peak_tflops if with_mfu else None,
              "flop_formula": __doc__.split("Model FLOPs")[1].split("`--block-only`")[0].strip()}  # fmt: skip
    with contextlib.suppress(ImportError):
        import triton

        header["triton"] = triton.__version__
    say(f"== { ({k: v for k, v in header.items() if k != 'flop_formula'}) }", flush=True)
    tag = f"_{args.label}" if args.label else ""
    if "math-jvp" in args.attention and dist.get_world_size() > 1:
        raise SystemExit("--attention math-jvp replaces the Ulysses core: run it on one GPU")
    if args.block_only and dist.get_world_size() > 1:
        raise SystemExit("--block-only emulates one CP rank on one GPU: run it without torchrun")
    if args.block_only:
        result = {**header, "block": {}}
        passes = None
        if args.passes_from and args.passes_from.is_file():
            step_rows = json.loads(args.passes_from.read_text())["rows"]
            passes = next((r["step_passes"] for r in step_rows if r.get("step_passes")), None)

        def save_block() -> None:
            # from the rank's share alone, so a run cut short during the all-tokens setting still has it
            result["projection"] = projection_cp(result["block"], passes, args.a2a_gbs)
            md = f"{header['date']}, {header['device']}, torch {header['torch']}, {' '.join(sys.argv[1:])}\n\n"
            md += block_table(result["block"]) + "\n" + json.dumps(result.get("projection", {}), indent=1) + "\n"
            (args.out / f"wan_block{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
            (args.out / f"wan_block{tag}.md").write_text(md)

        bench_block(args, device, result["block"], save_block)
        save_block()
        say((args.out / f"wan_block{tag}.md").read_text(), flush=True)
        dist.destroy_process_group()
        return
    config = WAN_CONFIGS[args.model]
    result = {**header, "config": config, "rows": []}

    def save() -> None:
        if rank0():
            md = f"{header['date']}, {header['device']}, torch {header['torch']}, {' '.join(sys.argv[1:])}\n\n"
            md += step_table(result["rows"]) + "\nModel FLOPs:\n" + header["flop_formula"] + "\n"
            (args.out / f"wan_step{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
            (args.out / f"wan_step{tag}.md").write_text(md)

    for attention in [a for a in args.attention.split(",") if a]:
        for ac in [a for a in args.activation_checkpoint.split(",") if a]:
            result["rows"].append({})
            bench_config(args, config, device, attention, ac, result["rows"][-1], save)
            gc.collect()  # the configuration's networks went with bench_config's frame
            if device.type == "cuda":
                torch.cuda.empty_cache()
    say(step_table(result["rows"]), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
