"""Configuration: kw_only dataclasses per concern, presets as functions, strict dict/YAML loading.

`load_config` / `config_from_dict` turn a YAML file or a JSON-like dict (the service's job spec, later)
into a `DistillConfig` once; an unknown key or a bad value raises `ConfigError` naming its dotted path.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user configuration is invalid; the message names the offending key."""


# --------------------------------------------------------------------------------------------------- sections


@dataclass(kw_only=True)
class DataConfig:
    # ring8 / grid25: 2-D mixtures of Gaussians (MLP teacher); shapes: the built-in text-to-image task;
    # teacher-synthetic: a diffusers teacher's own samples on placeholder text conditions (rcm_core.tasks.diffusers);
    # latents: an rcm-latents-v1 dataset (rcm_core.data.latent_shards) at `uri`, streamed (diffusers teachers)
    dataset: Literal["ring8", "grid25", "shapes", "teacher-synthetic", "latents"] = "ring8"
    mode_std: float = 0.05  # 2-D only: std of each Gaussian, in data units (data is scaled to about unit variance)
    prompt_file: str | None = None  # shapes only: draw captions from this file (one per line) instead of the grammar
    pool_size: int = 0  # shapes on a GPU: pre-render this many scenes (0 = render every batch on the CPU)
    # teacher-synthetic only:
    latent_shape: list[int] = field(default_factory=list)  # (C, F, H, W) of one latent; required there
    text_tokens: int = 512  # L of the text-embedding tokens (both pipelines pad prompts to 512)
    num_prompts: int = 32  # placeholder conditions in the pool, one teacher sample x0 each
    sample_steps: int = 50  # teacher Euler steps (with CFG) that draw each pool sample
    # latents only (latent_shape and text_tokens are then the manifest's, filled in by whoever opens the dataset):
    uri: str | None = None  # the dataset's root: s3://bucket/prefix/ (a job) or a local directory (the CLI)
    shuffle_buffer: int = 64  # samples in each rank's shuffle buffer (rcm_core.data.latent_stream)

    def __post_init__(self) -> None:
        if not self.mode_std > 0:
            raise ValueError(f"mode_std must be > 0, got {self.mode_std}")
        if self.prompt_file is not None and self.dataset != "shapes":
            raise ValueError("prompt_file is only valid with dataset 'shapes'")
        if self.pool_size < 0:
            raise ValueError(f"pool_size must be >= 0, got {self.pool_size}")
        if self.dataset == "teacher-synthetic":
            if len(self.latent_shape) != 4 or min(self.latent_shape) < 1:
                raise ValueError(f"latent_shape must be 4 positive sizes (C, F, H, W), got {self.latent_shape}")
            if min(self.text_tokens, self.num_prompts, self.sample_steps) < 1:
                raise ValueError("text_tokens, num_prompts and sample_steps must be >= 1")
        elif self.dataset == "latents":
            if not self.uri:
                raise ValueError("uri (the dataset's root) is required with dataset 'latents'")
            if self.latent_shape and (len(self.latent_shape) != 4 or min(self.latent_shape) < 1):
                raise ValueError(f"latent_shape must be 4 positive sizes (C, F, H, W), got {self.latent_shape}")
            if self.shuffle_buffer < 1:
                raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        elif self.latent_shape:
            raise ValueError(f"latent_shape is only valid with dataset 'teacher-synthetic', not {self.dataset!r}")
        if self.uri is not None and self.dataset != "latents":
            raise ValueError(f"uri is only valid with dataset 'latents', not {self.dataset!r}")


@dataclass(kw_only=True)
class MLPConfig:
    hidden_dim: int = 128  # width of the residual MLP
    num_layers: int = 3  # residual blocks
    time_embed_dim: int = 64  # sinusoidal features of the time input

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "num_layers", "time_embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class TeacherConfig:
    path: str | None = None  # teacher checkpoint (safetensors, or a diffusers transformer directory); None = built in
    family: str | None = None  # diffusers teachers: rcm_core.teachers family (e.g. "wan2.1"); None = from config.json
    parameterization: Literal["rf", "trigflow"] = "rf"  # what the teacher network predicts
    guidance_scale: float = 1.5  # CFG weight w: F = F_uncond + w * (F_cond - F_uncond); 1 = no guidance
    train_steps: int = 3000  # only when the teacher is trained here
    train_batch_size: int = 512  # samples per teacher step
    train_lr: float = 2e-3  # AdamW learning rate of teacher training
    label_dropout: float = 0.1  # probability of the null condition during teacher training (for CFG)

    def __post_init__(self) -> None:
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")


@dataclass(kw_only=True)
class LoraConfig:
    """A LoRA student (rcm_core.teachers.lora): the teacher's weights frozen, rank-`rank` adapters on the named
    linears of every transformer block; only the adapters train, checkpoint and export."""

    rank: int  # r of the low-rank update B A (A: r x in, B: out x r)
    alpha: float  # the update is scaled by alpha / rank (peft's lora_alpha)
    target_modules: list[str]  # block linears by diffusers name: to_q, to_k, to_v, to_out.0, ... (Family)
    dropout: float = 0.0  # dropout on the adapters' input (peft's lora_dropout)

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= LORA_MAX_RANK:
            raise ValueError(f"rank must be in [1, {LORA_MAX_RANK}], got {self.rank}")
        if not 0 < self.alpha <= 4 * LORA_MAX_RANK:
            raise ValueError(f"alpha must be in (0, {4 * LORA_MAX_RANK}], got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules or len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of distinct names, got {self.target_modules}")


LORA_MAX_RANK = 1024  # larger than any block width of a supported family would make sense for


@dataclass(kw_only=True)
class StudentConfig:
    init: Literal["teacher"] = "teacher"  # the student starts as a copy of the teacher
    lora: LoraConfig | None = None  # None: every weight of the student trains; else only LoRA adapters


@dataclass(kw_only=True)
class LossConfig:
    scm_weight: float = 1.0  # weight of L_sCM (0 = DMD-only)
    dmd_weight: float = 0.01  # lambda, weight of L_DMD (0 = sCM-only); the paper's default is 0.01
    p_mean: float = 0.0  # log-normal proposal on tan t: mean of log tan t (sCM uses -0.8; 0 measured better in 2-D)
    p_std: float = 1.6  # ... and its std
    tangent_warmup_steps: int = 200  # r ramps linearly 0 -> 1 over these student steps
    tangent_norm_c: float = 0.1  # c in g / (||g|| + c)
    time_derivative: Literal["exact", "semi_continuous"] = "exact"  # JVP in t, or finite difference in t
    fd_step: float = 1e-4  # finite-difference time step of the semi-continuous variant (radians)
    max_rollout_steps: int = 4  # N_max: student rollouts draw N in [1, N_max]
    critic_ratio: int = 4  # fake-score updates per student update
    dmd_s_min: float = 0.02  # DMD / fake-score noise levels, uniform in RF time s
    dmd_s_max: float = 0.98

    def __post_init__(self) -> None:
        if self.scm_weight < 0 or self.dmd_weight < 0:
            raise ValueError("scm_weight and dmd_weight must be >= 0")
        if self.scm_weight == 0 and self.dmd_weight == 0:
            raise ValueError("scm_weight and dmd_weight are both 0: nothing to train")
        if self.p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {self.p_std}")
        if not 0 < self.fd_step < 0.1:
            raise ValueError(f"fd_step must be in (0, 0.1), got {self.fd_step}")
        if self.max_rollout_steps < 1 or self.critic_ratio < 1 or self.tangent_warmup_steps < 0:
            raise ValueError("max_rollout_steps and critic_ratio must be >= 1, tangent_warmup_steps >= 0")
        if not 0 < self.dmd_s_min < self.dmd_s_max < 1:
            raise ValueError(f"need 0 < dmd_s_min < dmd_s_max < 1, got {self.dmd_s_min}, {self.dmd_s_max}")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4  # student AdamW learning rate
    fake_lr: float = 1e-3  # fake-score AdamW learning rate
    beta1: float = 0.0  # AdamW betas; beta1 = 0 as in sCM/DMD2 for few-step distillation
    beta2: float = 0.99
    weight_decay: float = 0.0
    # max global grad norm (0 = off). With the per-sample summed losses the student's gradient norm is O(100s) on
    # 32x32 images, so 1.0 clips every step (a per-step normalisation ahead of AdamW); the shapes results were
    # measured so. The published rCM code does not clip.
    grad_clip: float = 1.0
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine: decay to 10% of lr at train.steps
    ema_sigma_rel: float = 0.05  # EDM2 power-function EMA width (relative std of the averaging profile)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.fake_lr <= 0:
            raise ValueError("lr and fake_lr must be > 0")
        if not 0 < self.ema_sigma_rel < 0.28:
            raise ValueError(f"ema_sigma_rel must be in (0, 0.28), got {self.ema_sigma_rel}")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1500  # student updates
    batch_size: int = 256  # samples per update
    seed: int = 0
    log_every: int = 100  # steps between progress lines
    checkpoint_every: int = 500  # steps between checkpoints (0 = only at the end)
    eval_every: int = 0  # steps between periodic evaluations of the EMA student (0 = none)
    output_dir: str = "runs/toy2d-rcm"  # checkpoints, reports and plots go here
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available (shapes; 2-D runs on the CPU)
    max_minutes: float = 0.0  # > 0: stop (with a checkpoint) at the first log step after training ran this long

    def __post_init__(self) -> None:
        if (
            self.steps < 1
            or self.batch_size < 1
            or self.log_every < 1
            or min(self.checkpoint_every, self.eval_every) < 0
        ):
            raise ValueError("steps, batch_size, log_every must be >= 1 and checkpoint_every, eval_every >= 0")
        if self.max_minutes < 0:
            raise ValueError(f"max_minutes must be >= 0, got {self.max_minutes}")


def check_mid_times(mid_times) -> None:
    """Raise ValueError unless `mid_times` are strictly decreasing TrigFlow times in (0.2, pi/2)."""
    values = [float(v) for v in mid_times]
    if not values or any(not 0.2 < v < _HALF_PI for v in values):
        raise ValueError(f"student mid times must be in (0.2, pi/2), got {values}")
    if any(a <= b for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"student mid times must be strictly decreasing, got {values}")


_HALF_PI = 1.5707963267948966


@dataclass(kw_only=True)
class EvalConfig:
    num_samples: int = 4000  # samples per evaluated sampler
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])  # student sampling steps
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 32])  # teacher Euler steps
    diversity_samples: int = 32  # shapes: samples per diversity prompt
    # intermediate times of the student's few-step sampler (n steps: pi/2 then the first n - 1 of these)
    student_mid_times: list[float] = field(default_factory=lambda: [1.5, 1.4, 1.0])

    def __post_init__(self) -> None:
        if self.num_samples < 10 or not self.student_steps or min(self.student_steps + self.teacher_steps) < 1:
            raise ValueError("num_samples must be >= 10 and every step count >= 1")
        check_mid_times(self.student_mid_times)


@dataclass(kw_only=True)
class DistillConfig:
    # toy2d (2-D datasets), shapes (text-to-image, data.dataset = shapes) or diffusers (a diffusers teacher,
    # data.dataset = teacher-synthetic)
    task: Literal["toy2d", "shapes", "diffusers"] = "toy2d"
    data: DataConfig = field(default_factory=DataConfig)
    model: MLPConfig = field(default_factory=MLPConfig)  # 2-D only; a shapes student copies its teacher's network
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        datasets = TASK_DATASETS[self.task]
        if self.data.dataset not in datasets:
            raise ValueError(f"task {self.task!r} does not match data.dataset {self.data.dataset!r}")
        if self.student.lora is not None and self.task != "diffusers":
            raise ValueError(
                f"student.lora: LoRA students need a diffusers teacher (task diffusers), not {self.task!r}"
            )


TASK_DATASETS = {"toy2d": ("ring8", "grid25"), "shapes": ("shapes",), "diffusers": ("teacher-synthetic", "latents")}


# --------------------------------------------------------------------------------------------------- presets


def toy2d_rcm() -> DistillConfig:
    """rCM on the 8-Gaussian ring: L = L_sCM + 0.01 * L_DMD."""
    return DistillConfig()


def _scm_only(cfg: DistillConfig) -> DistillConfig:
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, dmd_weight=0.0))


def _dmd_only(cfg: DistillConfig) -> DistillConfig:
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, scm_weight=0.0, dmd_weight=1.0))


def toy2d_scm() -> DistillConfig:
    return _scm_only(toy2d_rcm())


def toy2d_dmd() -> DistillConfig:
    return _dmd_only(toy2d_rcm())


def shapes_rcm() -> DistillConfig:
    """rCM of the built-in shapes teacher (text-to-image, CFG distilled): the short CPU schedule of the demo.

    The documented longer schedule (README "Shapes") is configs/shapes-rcm-gpu.yaml: lambda 0.26, 2,100 steps of
    batch 128 on a GPU.
    """
    return DistillConfig(
        task="shapes",
        data=DataConfig(dataset="shapes"),
        teacher=TeacherConfig(guidance_scale=2.0),
        loss=LossConfig(tangent_warmup_steps=100, critic_ratio=2),
        optim=OptimConfig(lr=1e-4, fake_lr=2e-4),
        train=TrainConfig(steps=30, batch_size=8, log_every=5, checkpoint_every=10, output_dir="runs/shapes-rcm"),
        # lower intermediate times than the 2-D default suit 32x32 images (H200 sweep, README "Shapes")
        eval=EvalConfig(
            num_samples=126,
            student_steps=[1, 2, 4],
            teacher_steps=[4],
            diversity_samples=8,
            student_mid_times=[1.1, 0.8, 0.5],
        ),
    )


def shapes_scm() -> DistillConfig:
    return _scm_only(shapes_rcm())


def shapes_dmd() -> DistillConfig:
    return _dmd_only(shapes_rcm())


def diffusers_rcm(guidance_scale: float = 5.0) -> DistillConfig:
    """rCM of a diffusers teacher (rcm_core.tasks.diffusers) after the published Wan2.1-T2V-1.3B recipe
    (NVlabs/rcm, rcm/configs/experiments/rcm/wan2pt1_t2v.py): student lr 2e-6, fake-score lr 4e-7, AdamW betas
    (0, 0.999), weight decay 0.01, no gradient clipping, log-normal proposal P_mean 0.7 / P_std 1.6, tangent
    warm-up over 1000 steps, one student update per 5 iterations (4 critic updates). Its DMD times are drawn by a
    shifted uniform proposal (shift 5); here they stay uniform in RF time. Few-step sampler times 1.5, 1.4, 1.0
    as its inference script. `guidance_scale` is g of F_u + g (F_c - F_u): the family's (Family.guidance_to_project).
    """
    return DistillConfig(
        task="diffusers",
        data=DataConfig(dataset="teacher-synthetic", latent_shape=[16, 1, 8, 8]),
        teacher=TeacherConfig(guidance_scale=guidance_scale),
        loss=LossConfig(p_mean=0.7, p_std=1.6, tangent_warmup_steps=1000, critic_ratio=4),
        optim=OptimConfig(lr=2e-6, fake_lr=4e-7, beta2=0.999, weight_decay=0.01, grad_clip=0.0),
        train=TrainConfig(steps=1000, batch_size=8, log_every=10, checkpoint_every=100, output_dir="runs/diffusers"),
        # teacher reference at 50 Euler steps; every sampler sees the same noise and placeholder conditions
        eval=EvalConfig(num_samples=10, student_steps=[1, 2, 4], teacher_steps=[50], student_mid_times=[1.5, 1.4, 1.0]),
    )


PRESETS = {
    "toy2d-rcm": toy2d_rcm,
    "toy2d-scm": toy2d_scm,
    "toy2d-dmd": toy2d_dmd,
    "shapes-rcm": shapes_rcm,
    "shapes-scm": shapes_scm,
    "shapes-dmd": shapes_dmd,
    "diffusers-rcm": diffusers_rcm,
}


# --------------------------------------------------------------------------------------------------- loading


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check and convert `value` to type `tp`; raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        return _build(tp, value, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, choices))}; got {_describe(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {_describe(value)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {_describe(value)}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # programming error, not user input


def _build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _convert(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def build_dataclass(cls: type, data: dict[str, Any]) -> Any:
    """Validate `data` against any config dataclass `cls` (unknown keys and bad values raise ConfigError)."""
    return _build(cls, data, "")


def config_from_dict(data: dict[str, Any], *, base: DistillConfig | None = None) -> DistillConfig:
    """Validate a dict against `DistillConfig`, starting from `base` (defaults when None)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {_describe(data)}")
    merged = _merge(config_to_dict(base or DistillConfig()), data)
    return _build(DistillConfig, merged, "")


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path) -> DistillConfig:
    """Read a YAML file; `preset: NAME` at the top picks the base the rest of the file overrides."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    preset = data.pop("preset", "toy2d-rcm")
    if preset not in PRESETS:
        raise ConfigError(f"preset: must be one of {', '.join(PRESETS)}; got {_describe(preset)}")
    return config_from_dict(data, base=PRESETS[preset]())


def apply_overrides(cfg: DistillConfig, overrides: list[str]) -> DistillConfig:
    """Apply `section.key=value` overrides (values parsed as YAML scalars)."""
    update: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        node = update
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return config_from_dict(update, base=cfg)
