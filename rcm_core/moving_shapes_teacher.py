"""The moving-shapes text-to-video teacher: a small `diffusers.WanTransformer3DModel` (Wan2.1 architecture: 3-D
RoPE, (1, 4, 4) patching, cross-attention to text tokens, adaLN-style modulation) trained from scratch on
rendered clips with Wan's rectified-flow objective, and shipped in diffusers format.

    rcm teacher train --preset moving-shapes --out DIR [--set steps=...] [--set pool_size=...]

Objective (Wan2.1 / rectified flow): x_s = (1 - s) x0 + s eps, the network predicts v = eps - x0, MSE; s is drawn
uniformly and then shifted, s = shift u / (1 + (shift - 1) u) (the `shift` of diffusers'
FlowMatchEulerDiscreteScheduler; Wan uses 3-5 on 480p-720p latents, 1 (no shift) suits 32x32 pixels). The
text is dropped (replaced by the null condition: zero tokens, mask False) with probability `caption_dropout`, so
classifier-free guidance works. bf16 autocast on CUDA (WanNet keeps the time path in float32), AdamW with a
linear warm-up, gradient clipping at 1, an EMA of the weights is what is saved.
Data: a pool of `pool_size` train-split clips rendered once by `pool_workers` processes and held on the device
as uint8 (GPU throughput), plus the frozen text encoder's tokens of every grammar prompt; or, with pool_size 0,
clips rendered afresh for every batch (CPU tests).
Network: the project's WanNet forward over the diffusers module (rcm_core.teachers.wan), the same code that
distils it, so the teacher is trained exactly as it is later evaluated.

Saved folder (the layout `rcm_core.teachers.load_diffusers_teacher` and the `diffusers` task read):
    config.json, diffusion_pytorch_model.safetensors   save_pretrained of WanTransformer3DModel (bf16, except
                                                       the modules diffusers keeps in float32)
    moving_shapes.json                                  text-encoder spec, default sampler, training record,
                                                       training config, evaluation (if any)
    README.md                                           model card
Default sampler: `sample_steps` Euler steps uniform in RF time (rcm_core.sampling.sample_euler, the sampler the
diffusers task uses for its teacher rows) with CFG uncond + w (cond - uncond), w = `guidance_scale`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rcm_core.data import moving_shapes
from rcm_core.data.moving_shapes_text import FrozenTextEncoder
from rcm_core.models.flow import FlowModel, guided_f
from rcm_core.sampling import sample_euler

METADATA = "moving_shapes.json"
CLIP_SHAPE = (3, moving_shapes.FRAMES, moving_shapes.IMAGE_SIZE, moving_shapes.IMAGE_SIZE)  # (C, F, H, W)


@dataclass(kw_only=True)
class MovingShapesTeacherConfig:
    # -- architecture: WanTransformer3DModel (Wan2.1 T2V defaults for what is not listed) --
    # patch (1, 4, 4): 8 x 8 x 8 = 512 tokens a clip; Wan's temporal patch of 1 keeps every frame a token row,
    # so motion of 1 px / frame is resolved by the 4x4 patch's content, and 512 tokens keep a batch of 256
    # clips at 131k tokens (fast enough to train in minutes on one GPU)
    patch_size: list[int] = field(default_factory=lambda: [1, 4, 4])
    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 64  # width 256; head dim 64 is one the fused JVP kernel supports
    ffn_dim: int = 1024
    freq_dim: int = 256
    # -- text: the frozen encoder (rcm_core.data.moving_shapes_text) --
    text_tokens: int = 16
    text_dim: int = 64
    text_seed: int = 0
    # -- training --
    steps: int = 20000
    batch_size: int = 256
    lr: float = 3e-4
    warmup_steps: int = 300
    weight_decay: float = 0.0
    caption_dropout: float = 0.1
    shift: float = 1.0  # timestep shift of the training distribution (see the module docstring)
    ema_decay: float = 0.999
    seed: int = 0
    pool_size: int = 0  # > 0: pre-render this many train clips once and keep them on the device
    pool_workers: int = 0
    max_seconds: float = 0.0  # > 0: stop (at a logged step) once training has run this long
    log_every: int = 200
    init: str | None = None  # start from this teacher folder's weights instead of from scratch
    # -- default sampler (recorded with the weights) --
    sample_steps: int = 50
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        self.patch_size = [int(p) for p in self.patch_size]
        if len(self.patch_size) != 3 or any(n % p for n, p in zip(CLIP_SHAPE[1:], self.patch_size, strict=True)):
            raise ValueError(f"patch_size must be 3 integers dividing (F, H, W) = {CLIP_SHAPE[1:]}")
        sizes = (self.num_layers, self.num_attention_heads, self.attention_head_dim, self.ffn_dim, self.steps)
        if min(*sizes, self.batch_size, self.sample_steps) < 1:
            raise ValueError("sizes, steps, batch_size and sample_steps must be >= 1")
        if self.attention_head_dim % 2:
            raise ValueError("attention_head_dim must be even (RoPE rotates pairs)")
        if not 0 <= self.caption_dropout < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError("caption_dropout and ema_decay must be in [0, 1)")
        if self.shift <= 0 or min(self.warmup_steps, self.pool_size, self.pool_workers, self.max_seconds) < 0:
            raise ValueError("shift must be > 0; warmup_steps, pool_size, pool_workers, max_seconds >= 0")

    def wan_config(self) -> dict:
        """Keyword arguments of WanTransformer3DModel."""
        return dict(
            patch_size=tuple(self.patch_size),
            num_attention_heads=self.num_attention_heads,
            attention_head_dim=self.attention_head_dim,
            in_channels=3,
            out_channels=3,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        )

    def encoder(self) -> FrozenTextEncoder:
        return FrozenTextEncoder(tokens=self.text_tokens, dim=self.text_dim, seed=self.text_seed)


def init_wan_weights(model: nn.Module) -> None:
    """From-scratch initialisation following Wan2.1's WanModel.init_weights: Xavier-uniform linears with zero
    biases (patch embedding too, as a linear on flattened patches), N(0, 0.02) for the text and time
    embedders, and a zero output projection (the network starts by predicting v = 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(model.patch_embedding.weight.flatten(1))
        nn.init.zeros_(model.patch_embedding.bias)
        ce = model.condition_embedder
        for m in [*ce.text_embedder.modules(), *ce.time_embedder.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(model.proj_out.weight)
        nn.init.zeros_(model.proj_out.bias)


def build_teacher_net(cfg: MovingShapesTeacherConfig, *, seed: int = 0):
    """A freshly initialised WanTransformer3DModel wrapped in the project's WanNet (float32)."""
    from rcm_core.teachers.wan import WAN21, WanNet

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WAN21.diffusers_class()(**cfg.wan_config())  # diffusers.WanTransformer3DModel
        init_wan_weights(model)
    return WanNet.from_diffusers(model)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ClipSource:
    """(x0 (B, 3, F, H, W) in [-1, 1], prompt ids (B,)) batches of train-split clips: a device-side uint8 pool
    (pool_size > 0, rendered once in pool_workers processes) or clips rendered afresh per batch."""

    def __init__(self, cfg: MovingShapesTeacherConfig, device: torch.device):
        from rcm_core.data.moving_shapes_dataset import CHUNK, render_chunk

        self.device = device
        self.prompts = moving_shapes.all_prompts()
        self.index = {p.caption(): i for i, p in enumerate(self.prompts)}
        self.rng = np.random.default_rng([cfg.seed, 1])
        self.pool = None
        if cfg.pool_size > 0:
            jobs = [
                (cfg.seed, "train", c, min(CHUNK, cfg.pool_size - c * CHUNK)) for c in range(-(-cfg.pool_size // CHUNK))
            ]
            if cfg.pool_workers > 1:
                import multiprocessing as mp

                with mp.get_context("spawn").Pool(cfg.pool_workers) as pool:
                    parts = pool.map(render_chunk, jobs)
            else:
                parts = [render_chunk(j) for j in jobs]
            clips = np.concatenate([c for c, _ in parts])  # (N, F, H, W, 3) uint8
            self.pool = torch.from_numpy(clips).to(device)
            self.pool_ids = torch.tensor([self.index[c] for _, caps in parts for c in caps], device=device)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool is not None:
            i = torch.randint(len(self.pool), (batch_size,), generator=generator, device=generator.device)
            i = i.to(self.device)
            clips, ids = self.pool[i], self.pool_ids[i]
        else:
            prompts = [moving_shapes.sample_prompt(self.rng) for _ in range(batch_size)]
            clips = torch.from_numpy(np.stack([moving_shapes.render_clip(p, self.rng)[0] for p in prompts]))
            clips = clips.to(self.device)
            ids = torch.tensor([self.index[p.caption()] for p in prompts], device=self.device)
        x0 = clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (B, F, H, W, 3) u8 -> (B, 3, F, H, W)
        return x0, ids


def shifted_times(u: torch.Tensor, shift: float) -> torch.Tensor:
    """s = shift u / (1 + (shift - 1) u): diffusers FlowMatchEulerDiscreteScheduler's time shift (identity at 1)."""
    return shift * u / (1 + (shift - 1) * u)


def train_moving_shapes_teacher(cfg: MovingShapesTeacherConfig, *, progress=None) -> tuple[nn.Module, dict]:
    """Train (see the module docstring); returns the EMA network (WanNet, eval mode) and a training record."""
    torch.manual_seed(cfg.seed)
    device = _device()
    start = time.perf_counter()
    data = ClipSource(cfg, device)
    render_seconds = time.perf_counter() - start
    encoder = cfg.encoder()
    table = encoder.cond([p.caption() for p in data.prompts], device=device)  # tokens of every prompt
    net = build_teacher_net(cfg, seed=cfg.seed)
    if cfg.init:
        from rcm_core.teachers import load_diffusers_net

        loaded, _, _ = load_diffusers_net(cfg.init, dtype=torch.float32)
        net.load_state_dict(loaded.state_dict())
    net = net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    flow = FlowModel(net, "rf")
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    num_params = sum(p.numel() for p in net.parameters())
    start = time.perf_counter()
    step, loss, losses = 0, torch.zeros(()), []
    for step in range(1, cfg.steps + 1):
        x0, ids = data.sample(cfg.batch_size, gen)
        keep = torch.rand(cfg.batch_size, generator=gen, device=device) >= cfg.caption_dropout
        mask = table["mask"][ids] & keep[:, None]  # dropped captions: the null prompt (zero tokens, no mask)
        cond = {"tokens": table["tokens"][ids] * mask[..., None], "mask": mask}
        eps = torch.randn(x0.shape, generator=gen, device=device)
        u = torch.rand(cfg.batch_size, generator=gen, device=device, dtype=torch.float64)
        s = shifted_times(u, cfg.shift)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, step / max(cfg.warmup_steps, 1))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = flow.native_loss(x0, eps, s, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # short warm-up of the average
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
        logged = step % cfg.log_every == 0 or step == cfg.steps
        if logged:
            losses.append((step, round(loss.item(), 5), round(time.perf_counter() - start, 1)))
            if progress is not None:
                progress(step, cfg.steps, loss.item())
            if cfg.max_seconds and time.perf_counter() - start > cfg.max_seconds:
                break  # time budget spent: keep what was trained (the record says how many steps)
    record = {
        "steps_done": step,
        "batch_size": cfg.batch_size,
        "clips_seen": step * cfg.batch_size,
        "train_seconds": round(time.perf_counter() - start, 1),
        "render_seconds": round(render_seconds, 1),
        "final_loss": loss.item(),
        "loss_curve": losses,
        "num_parameters": num_params,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "git_commit": _git_commit(),
    }
    return ema.eval(), record


def _git_commit() -> str | None:
    """HEAD of the checkout; RCM_GIT_COMMIT when set (a copied working tree without .git, e.g. a GPU machine)."""
    import os

    if os.environ.get("RCM_GIT_COMMIT"):
        return os.environ["RCM_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_clips(
    net: nn.Module,
    encoder: FrozenTextEncoder,
    captions: list[str],
    *,
    steps: int,
    guidance_scale: float,
    seed: int = 0,
    batch_size: int = 256,
) -> np.ndarray:
    """(N, F, H, W, 3) uint8 clips: the default sampler (Euler uniform in RF time + CFG) from seeded noise."""
    device = next(net.parameters()).device
    flow = FlowModel(net, "rf")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(captions), *CLIP_SHAPE), generator=gen)
    out = []
    for i in range(0, len(captions), batch_size):
        cond = encoder.cond(captions[i : i + batch_size], device=device)
        null = encoder.null_cond(len(cond["mask"]), device=device)
        z = noise[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = sample_euler(lambda x, t, c=cond, n=null: guided_f(flow, x, t, c, n, guidance_scale), z, steps)
        out.append(moving_shapes.to_uint8_clips(x.float()))
    return np.concatenate(out)


def quick_check(prompts: list[moving_shapes.MovingPrompt], clips: np.ndarray) -> dict[str, float]:
    """A diagnostic, not the benchmark's judge: the shapes judge (rcm_core.eval.geneval) on frame 0 against the
    base prompt, and the mean displacement of all detected objects' centroids from frame 0 to the last frame
    against the captioned one (within 2 px); per category and overall (mean over categories)."""
    from rcm_core.eval.geneval import detect, judge

    hits: dict[str, list[float]] = {}
    motion: list[float] = []
    for p, clip in zip(prompts, clips, strict=True):
        first, last = detect(clip[0]), detect(clip[-1])
        hits.setdefault(p.category, []).append(float(judge(p.base, first)))
        ok = False
        if first and len(first) == len(last):
            dx = np.mean([o.cx for o in last]) - np.mean([o.cx for o in first])
            dy = np.mean([o.cy for o in last]) - np.mean([o.cy for o in first])
            vx, vy = p.velocity
            ok = math.hypot(dx - vx * (moving_shapes.FRAMES - 1), dy - vy * (moving_shapes.FRAMES - 1)) <= 2.0
        motion.append(float(ok))
    per_cat = {c: float(np.mean(v)) for c, v in sorted(hits.items())}
    return {"frame0_overall": float(np.mean(list(per_cat.values()))), "motion": float(np.mean(motion)), **per_cat}


def write_strip(clips: np.ndarray, path: Path, *, scale: int = 3) -> Path:
    """A PNG, one row per clip, its frames left to right (scaled `scale` x, 2 px gaps); a GIF beside it."""
    from PIL import Image

    n, f, h, w, _ = clips.shape
    cell_h, cell_w = h * scale + 2, w * scale + 2
    img = Image.new("RGB", (f * cell_w, n * cell_h), (90, 90, 90))
    for r, clip in enumerate(clips):
        for c, frame in enumerate(clip):
            img.paste(Image.fromarray(frame).resize((w * scale, h * scale), Image.NEAREST), (c * cell_w, r * cell_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    frames = [
        Image.fromarray(np.concatenate(list(clips[:, k]), axis=1)).resize((n * w * scale, h * scale), Image.NEAREST)
        for k in range(f)
    ]
    frames[0].save(path.with_suffix(".gif"), save_all=True, append_images=frames[1:], duration=150, loop=0)
    return path


JUDGE_HOOK = "rcm_core.eval.moving_shapes.score_clips"  # (prompts, clips (N, F, H, W, 3) uint8) -> {"overall", ...}


def judge_clips(prompts: list[moving_shapes.MovingPrompt], clips: np.ndarray) -> tuple[dict[str, float], str]:
    """(scores, judge name): the benchmark's per-clip judge when the project has it (JUDGE_HOOK), else
    `quick_check`; the name says which one scored."""
    import importlib

    module, _, name = JUDGE_HOOK.rpartition(".")
    try:
        score_clips = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return quick_check(prompts, clips), "quick_check"
    return dict(score_clips(prompts, clips)), JUDGE_HOOK


def _headline(scores: dict[str, float]) -> float:
    if "overall" in scores:
        return float(scores["overall"])
    return (scores["frame0_overall"] + scores["motion"]) / 2  # quick_check: both halves count


def sweep_guidance(
    folder: str | Path,
    scales: list[float],
    *,
    steps: int | None = None,
    seed: int = 0,
    samples_per_prompt: int = 1,
    max_prompts: int = 0,
    strip: Path | None = None,
    log=lambda line: None,
) -> dict:
    """Sample the evaluation prompts at each CFG scale with the default sampler's steps, score them, make the best
    scale the folder's default sampler (recorded with every row in moving_shapes.json's `eval`), and write a
    strip of 8 evaluation prompts at that scale. `max_prompts` > 0: an evenly spaced subset of the evaluation
    prompts. Returns the `eval` record."""
    device = _device()
    net, encoder, meta = load_moving_shapes_teacher(folder, device=device)
    steps = steps or int(meta["default_sampler"]["steps"])
    chosen = moving_shapes.eval_prompts()
    if 0 < max_prompts < len(chosen):  # an evenly spaced subset (smoke runs)
        chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, max_prompts).round().astype(int)]
    prompts = [p for p in chosen for _ in range(samples_per_prompt)]
    rows, best_clips, best_score = [], None, 0.0
    for w in scales:
        start = time.perf_counter()
        clips = sample_clips(net, encoder, [p.caption() for p in prompts], steps=steps, guidance_scale=w, seed=seed)
        scores, judge = judge_clips(prompts, clips)
        row = {"guidance_scale": w, "steps": steps, "judge": judge, **scores}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        log(json.dumps(row))
        if best_clips is None or _headline(scores) > best_score:
            best_clips, best_score = clips, _headline(scores)
    best = rows[max(range(len(rows)), key=lambda i: _headline(rows[i]))]  # the first of equal scores
    record = {
        "rows": rows,
        "prompts": len(prompts),
        "seed": seed,
        "chosen_guidance_scale": best["guidance_scale"],
        "chosen_by": f"highest {'overall' if 'overall' in best else '(frame0_overall + motion) / 2'} "
        f"of {best['judge']}",
    }
    sampler = {**meta["default_sampler"], "steps": steps, "guidance_scale": best["guidance_scale"]}
    update_metadata(folder, default_sampler=sampler, eval=record)
    if strip is not None and best_clips is not None:
        picks = np.linspace(0, len(prompts) - 1, 8).round().astype(int)
        write_strip(best_clips[picks], strip)
        (strip.with_suffix(".txt")).write_text("\n".join(prompts[i].caption() for i in picks) + "\n")
    return record


# ----------------------------------------------------------------------------------------------- save / load


def save_moving_shapes_teacher(net: nn.Module, out: Path, cfg: MovingShapesTeacherConfig, record: dict) -> Path:
    """save_pretrained (bf16, diffusers' float32 modules kept) + moving_shapes.json + README.md under `out`."""
    from rcm_core.tasks.diffusers import _bf16_except_fp32_modules
    from rcm_core.teachers.wan import WAN21

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _bf16_except_fp32_modules({k: v.detach().cpu() for k, v in net.state_dict().items()}, WAN21)
    net.to_diffusers(state).save_pretrained(str(out))
    meta = {
        "task": "moving-shapes",
        "renderer": moving_shapes.RENDERER_VERSION,
        "clip_shape": list(CLIP_SHAPE),
        "text_encoder": cfg.encoder().spec(),
        "default_sampler": default_sampler(cfg),
        "training": record,
        "config": dataclasses.asdict(cfg),
    }
    (out / METADATA).write_text(json.dumps(meta, indent=1) + "\n")
    (out / "README.md").write_text(model_card(meta))
    return out


def default_sampler(cfg: MovingShapesTeacherConfig) -> dict:
    return {
        "sampler": "euler",
        "steps": cfg.sample_steps,
        "time_grid": "uniform in RF time s from 1 to 0 (rcm_core.sampling.sample_euler; shift 1)",
        "guidance_scale": cfg.guidance_scale,
        "guidance_form": "uncond + w (cond - uncond); uncond = the null prompt (zero tokens, mask False)",
    }


def model_card(meta: dict) -> str:
    cfg, rec, smp, enc = meta["config"], meta["training"], meta["default_sampler"], meta["text_encoder"]
    lines = [
        "# moving-shapes teacher (Wan2.1 architecture)",
        "",
        "A small `diffusers.WanTransformer3DModel` trained (from Wan2.1's initialisation) on the project's "
        "moving-shapes "
        "text-to-video task (rcm_core/data/moving_shapes.py): clips (3, 8, 32, 32) in pixel space, [-1, 1].",
        "",
        f"- architecture: {cfg['num_layers']} layers, {cfg['num_attention_heads']} heads x "
        f"{cfg['attention_head_dim']}, ffn {cfg['ffn_dim']}, patch {tuple(cfg['patch_size'])}, text_dim "
        f"{cfg['text_dim']}; {rec.get('num_parameters', 0) / 1e6:.2f} M parameters",
        f"- text: frozen word + position embeddings `{enc['name']}` v{enc['version']} (L={enc['tokens']}, "
        f"D={enc['dim']}, seed {enc['seed']}, sha256 {enc['sha256'][:16]}...): `FrozenTextEncoder.from_spec` "
        "of moving_shapes.json's text_encoder",
        f"- objective: rectified flow (v = eps - x0), time shift {cfg['shift']}, caption dropout "
        f"{cfg['caption_dropout']}, AdamW lr {cfg['lr']}, batch {cfg['batch_size']}, EMA {cfg['ema_decay']}",
        f"- trained: {rec.get('steps_done')} steps in {rec.get('train_seconds')} s on {rec.get('device')} "
        f"(torch {rec.get('torch')}), {rec.get('date')}, git {rec.get('git_commit')}",
        f"- default sampler: {smp['steps']} Euler steps, CFG {smp['guidance_scale']} ({smp['guidance_form']})",
    ]
    earlier = rec.get("init_from") or {}
    while earlier.get("training"):  # earlier sittings this one continued from
        t = earlier["training"]
        lines.append(
            f"- continued from: {t.get('steps_done')} steps of batch {t.get('batch_size')} in "
            f"{t.get('train_seconds')} s on {t.get('device')}, {t.get('date')}, git {t.get('git_commit')}"
        )
        earlier = t.get("init_from") or {}
    if "eval" in meta:
        ev = meta["eval"]
        lines.append(f"- default guidance chosen by {ev['chosen_by']} over {ev['prompts']} evaluation clips:")
        lines += [f"  - {json.dumps(r)}" for r in ev["rows"]]
    return "\n".join(lines) + "\n"


def read_metadata(folder: str | Path) -> dict:
    path = Path(folder) / METADATA
    if not path.is_file():
        raise ValueError(f"{folder}: no {METADATA} (not a moving-shapes teacher folder)")
    return json.loads(path.read_text())


def load_moving_shapes_teacher(folder: str | Path, *, device=None) -> tuple[nn.Module, FrozenTextEncoder, dict]:
    """(WanNet float32 in eval mode, its text encoder, the metadata) from a saved teacher folder."""
    from rcm_core.teachers import load_diffusers_net

    meta = read_metadata(folder)
    net, _, _ = load_diffusers_net(folder, dtype=torch.float32)
    encoder = FrozenTextEncoder.from_spec(meta["text_encoder"])
    return net.to(device or "cpu").eval(), encoder, meta


def update_metadata(folder: str | Path, **fields) -> dict:
    """Merge `fields` into moving_shapes.json (e.g. eval, a re-chosen default_sampler) and rewrite the card."""
    meta = {**read_metadata(folder), **fields}
    (Path(folder) / METADATA).write_text(json.dumps(meta, indent=1) + "\n")
    (Path(folder) / "README.md").write_text(model_card(meta))
    return meta


# ----------------------------------------------------------------------------------------------- command line


def train_command(out: str, overrides: dict, *, evaluate: bool = True, log=lambda line: None) -> dict:
    """Train with `overrides`, save under `out`, and (evaluate) write sample strips and the quick check."""
    from rcm_core.config import build_dataclass

    cfg = build_dataclass(MovingShapesTeacherConfig, overrides)
    log(f"[teacher] moving-shapes: {cfg.steps} steps of batch {cfg.batch_size} -> {out}")
    net, record = train_moving_shapes_teacher(
        cfg, progress=lambda s, n, loss: log(f"[teacher] step {s:>7}/{n}  loss={loss:.4f}")
    )
    if cfg.init:  # a later sitting: keep how the starting weights were made (a chain, earliest innermost)
        previous = read_metadata(cfg.init)
        record["init_from"] = {"training": previous.get("training"), "config": previous.get("config")}
    folder = save_moving_shapes_teacher(net, Path(out), cfg, record)
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    log(f"[teacher] saved {folder} ({size:.1f} MiB; {record['steps_done']} steps in {record['train_seconds']} s)")
    if evaluate:
        prompts = moving_shapes.eval_prompts()
        clips = sample_clips(
            net,
            cfg.encoder(),
            [p.caption() for p in prompts],
            steps=cfg.sample_steps,
            guidance_scale=cfg.guidance_scale,
        )
        check = quick_check(prompts, clips)
        update_metadata(
            folder, quick_check={**check, "prompts": len(prompts), "note": quick_check.__doc__.split(":")[0]}
        )
        log(json.dumps({"quick_check": check}))
    return record


__all__ = [
    "METADATA",
    "MovingShapesTeacherConfig",
    "build_teacher_net",
    "load_moving_shapes_teacher",
    "quick_check",
    "sample_clips",
    "save_moving_shapes_teacher",
    "train_moving_shapes_teacher",
]
