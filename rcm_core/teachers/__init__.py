"""Teachers in diffusers format: the registry of supported families and the public loader.

A family (one module per family here, e.g. rcm_core/teachers/wan.py) registers a `Family`: the diffusers
`_class_name` it loads, how to turn the loaded diffusers module into the project's own `TokenNet` over the same
submodules and weights (state-dict keys unchanged, so a student saves back in diffusers layout), and how its
pipeline's classifier-free guidance maps onto the project's `u + g (c - u)` form. The family's net takes the
rectified-flow input x_s at RF time s (float64, shape (B,)) and returns the RF velocity eps - x0; `FlowModel(net,
"rf")` turns that into the TrigFlow F-prediction by SNR matching (rcm_core.trigflow), with the coefficients in
float64.

Public entry point: `load_diffusers_teacher(path, dtype=None) -> FlowModel`, with
`forward(x_t (B, C, F, H, W), t (B,) TrigFlow radians, cond={"tokens": (B, L, D_text), "mask": (B, L) bool})`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rcm_core.config import ConfigError
from rcm_core.models.flow import FlowModel

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class Family:
    """A supported diffusers teacher family.

    Attributes:
        name: the job spec's `teacher.family` (e.g. "wan2.1").
        class_name: the diffusers class, as `_class_name` in the transformer's config.json.
        build_net: diffusers module (already loaded, weights in place) -> the project's TokenNet over its
            submodules; must leave the state-dict keys as diffusers has them.
        check_config: raises ConfigError naming the key when a config.json is a variant this family does not
            support (e.g. Wan I2V's image_dim).
        guidance_to_project: the pipeline's guidance_scale -> g of `u + g (c - u)` (Wan: identity; Cosmos's
            `c + w (c - u)`: 1 + w).
        default_guidance: the pipeline's default guidance_scale (its own form).
        lora_targets: the linears a LoRA student may adapt (rcm_core.teachers.lora), as peft names them (a suffix of the
            module path): those of the transformer blocks, not the time path. service/teachers.py lists the same.
        lora_loader: diffusers' LoRA loader mixin whose save_lora_weights writes the family's LoRA files.
    """

    name: str
    class_name: str
    build_net: Callable[[nn.Module], nn.Module]
    check_config: Callable[[dict], None]
    guidance_to_project: Callable[[float], float]
    default_guidance: float
    lora_targets: tuple[str, ...] = ()
    lora_loader: str | None = None

    def diffusers_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.class_name)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def read_config(path: str | Path) -> dict:
    """The transformer's config.json as a dict; ConfigError (naming the path) when it is missing or not JSON."""
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise ConfigError(f"teacher: {path} is not a diffusers transformer directory (no {CONFIG_NAME})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"teacher: {cfg_path} is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"teacher: {cfg_path} is not a JSON object")
    return cfg


def detect_family(config: dict, family: str | None = None) -> Family:
    """The registered family for a diffusers config (by `_class_name`); `family` must agree when given."""
    class_name = config.get("_class_name")
    matches = [f for f in FAMILIES.values() if f.class_name == class_name]
    if not matches:
        supported = ", ".join(f"{f.name} ({f.class_name})" for f in FAMILIES.values())
        raise ConfigError(f"teacher: _class_name {str(class_name)[:64]!r} is not supported; supported: {supported}")
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError(f"teacher.family: must be one of {', '.join(FAMILIES)}; got {family!r}")
        if FAMILIES[family].class_name != class_name:
            raise ConfigError(
                f"teacher.family: {family!r} loads {FAMILIES[family].class_name}, but config.json has {class_name!r}"
            )
        chosen = FAMILIES[family]
    else:
        chosen = matches[0]
    chosen.check_config(config)
    return chosen


def load_diffusers_net(path: str | Path, dtype: torch.dtype | None = None, family: str | None = None):
    """(the family's TokenNet with the checkpoint's weights, its Family, the config dict) from a local directory
    in the layout `save_pretrained` writes (config.json + safetensors, sharded with an index or not)."""
    config = read_config(path)
    fam = detect_family(config, family)
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    module = fam.diffusers_class().from_pretrained(str(path), **kwargs)
    return fam.build_net(module), fam, config


def diffusers_module(config: dict, state_dict: dict[str, torch.Tensor], family: Family | None = None) -> nn.Module:
    """The family's diffusers module (e.g. WanTransformer3DModel) built from `config` over `state_dict` (full,
    unsharded; the tensors are used in place, dtypes kept): what a student is `save_pretrained` from. `family`:
    needed when `config` has no `_class_name` (a module built in memory, never saved).

    Parameters are created on the meta device and then assigned, so no random init runs (a 14B model would take
    minutes and twice the memory); buffers, persistent or not (Wan's RoPE tables), are built for real.
    """
    from accelerate import init_empty_weights

    fam = family or detect_family(config)
    init_kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights(include_buffers=False):
        model = fam.diffusers_class().from_config(init_kwargs)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def load_diffusers_teacher(path: str | Path, dtype: torch.dtype | None = None, family: str | None = None) -> FlowModel:
    """A diffusers transformer directory -> the TrigFlow F-predictor `forward(x_t, t, cond)` (see module doc)."""
    net, _, _ = load_diffusers_net(path, dtype, family)
    return FlowModel(net, "rf")


def _register_builtin_families() -> None:
    # importing a family module registers it; a family whose module is absent is simply not offered
    import importlib

    for name in ("wan", "cosmos"):
        try:
            importlib.import_module(f"rcm_core.teachers.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rcm_core.teachers.{name}":
                raise


_register_builtin_families()

__all__ = [
    "FAMILIES",
    "Family",
    "detect_family",
    "diffusers_module",
    "load_diffusers_net",
    "load_diffusers_teacher",
    "register_family",
]
