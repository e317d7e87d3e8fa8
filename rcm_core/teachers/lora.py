"""LoRA students (Hu et al., arXiv 2106.09685) through peft: the teacher's weights frozen, a low-rank update
W + (alpha / r) B A on chosen linears of every transformer block; only A and B train.

How the rest of the method sees it (rcm_core.distill.Distiller with `student.lora`):
- the student (and its EMA) is built from `with_adapters(teacher_net, cfg)`: a structural copy of the teacher's
  network sharing its weight tensors, with peft's LoRA layers injected (B = 0, so the student starts as the
  teacher); copy_net then copies or shards that as it would the teacher, so FSDP2 units hold frozen base weights
  and trainable adapters side by side;
- the sCM tangent flows through the adapters by forward-mode AD of peft's lora.Linear (base linear + B(A x) s);
- only adapters get gradients, optimizer state and EMA averaging; checkpoints hold them alone (the base weights
  are the teacher's, loaded again at every start);
- the fake score stays a full copy of the teacher (DMD's critic).
Export (`write_lora`): diffusers' LoRA file, pytorch_lora_weights.safetensors, written by the family's loader
mixin (e.g. WanLoraLoaderMixin.save_lora_weights): keys transformer.<module>.lora_A.weight / lora_B.weight and
the peft LoraConfig as the lora_adapter_metadata header, which is what `load_lora_adapter` / `load_lora_weights`
read (the metadata carries alpha; without it diffusers would assume alpha = rank).

peft is imported inside the functions: importing rcm_core.tasks never imports it (tests/unit/test_import_rules.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from rcm_core.config import ConfigError, LoraConfig
from rcm_core.export import LORA_WEIGHTS

ADAPTER = "default"  # peft's adapter name; absent from exported keys
ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers Attention's projections


def lora_targets(ffn: str) -> tuple[str, ...]:
    """The target names of a family whose blocks hold diffusers Attention modules attn1 (self) and attn2 (cross)
    and a diffusers FeedForward named `ffn`: a projection of both attentions (to_q), of one (attn1.to_q), or a
    feed-forward linear (ffn.net.0.proj, ffn.net.2). peft matches a name as a suffix of the module path; these
    suffixes occur only inside the blocks, never on the time path (which must stay float32, rcm_core.parallel.fsdp)."""
    per_attention = tuple(f"attn{i}.{n}" for i in (1, 2) for n in ATTENTION_LINEARS)
    return (*ATTENTION_LINEARS, *per_attention, f"{ffn}.net.0.proj", f"{ffn}.net.2")


def check_targets(cfg: LoraConfig, family) -> None:
    """Raise ConfigError naming the first target the family does not offer (Family.lora_targets)."""
    if not family.lora_targets:
        raise ConfigError(f"student.lora: the {family.name} family has no LoRA targets")
    for i, name in enumerate(cfg.target_modules):
        if name not in family.lora_targets:
            raise ConfigError(
                f"student.lora.target_modules[{i}]: {name[:64]!r} is not a block linear of {family.name}; "
                f"one of {', '.join(family.lora_targets)}"
            )


def peft_config(cfg: LoraConfig):
    """peft's LoraConfig for `cfg`: B initialised to zero (the student starts as the teacher), no bias training."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=cfg.dropout,
        init_lora_weights=True,
        bias="none",
    )


def with_adapters(net: nn.Module, cfg: LoraConfig) -> nn.Module:
    """A copy of `net`'s module tree that shares its parameters and buffers (no weight copied), with LoRA layers
    on cfg.target_modules: the base weights frozen, only the adapters requiring grad. `net` itself is left as it
    is (its modules are not replaced) but its weights are now shared: treat them as read-only.

    Raises:
        ConfigError: a target matches no module of `net`.
    """
    from peft import inject_adapter_in_model

    # requires_grad belongs to the shared tensors: record it, since peft freezes every base weight it sees
    flags = [(p, p.requires_grad) for p in net.parameters()]
    memo: dict[int, object] = {id(t): t for t in (*net.parameters(), *net.buffers())}
    tree = copy.deepcopy(net, memo)
    try:
        tree = inject_adapter_in_model(peft_config(cfg), tree, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ConfigError(f"student.lora.target_modules: {str(exc).splitlines()[0][:200]}") from None
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    names = {n for n, _ in tree.named_modules()}
    for i, target in enumerate(cfg.target_modules):
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ConfigError(f"student.lora.target_modules[{i}]: {target!r} matches no module of the network")
    for name, p in tree.named_parameters():
        p.requires_grad_(is_adapter(name))  # the base weights are the teacher's: frozen
    return tree


def is_adapter(name: str) -> bool:
    """Whether a parameter/state-dict name is a LoRA adapter weight (peft's lora_A / lora_B)."""
    return ".lora_A." in name or ".lora_B." in name


def adapter_names(module: nn.Module) -> set[str]:
    """The state-dict names of `module`'s trainable parameters (the adapters of a LoRA student)."""
    return {n for n, p in module.named_parameters() if p.requires_grad}


def exported_adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA student's full state dict -> its adapters under the names diffusers reads (peft's, without the
    adapter name: blocks.0.attn1.to_q.lora_A.weight)."""
    tag = f".{ADAPTER}."
    return {k.replace(tag, "."): v for k, v in state.items() if is_adapter(k)}


def write_lora(out: Path, adapters: dict[str, torch.Tensor], cfg: LoraConfig, family) -> Path:
    """pytorch_lora_weights.safetensors in `out`, written by the family's diffusers LoRA loader (module docstring).

    Args:
        adapters: `exported_adapters` of the student (tensors as they should be stored, e.g. bfloat16).
    Returns:
        The file's path.
    """
    import diffusers

    mixin = getattr(diffusers.loaders.lora_pipeline, family.lora_loader)
    metadata = peft_config(cfg).to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set in peft; JSON wants a list
    metadata["peft_type"] = str(metadata["peft_type"].value)
    mixin.save_lora_weights(
        str(out),
        transformer_lora_layers={k: v.contiguous() for k, v in adapters.items()},
        transformer_lora_adapter_metadata=metadata,
    )
    return out / LORA_WEIGHTS


def load_lora_student(teacher_dir: Path, export_dir: Path):
    """A LoRA export applied the diffusers way: the teacher transformer's `from_pretrained` (float32), then
    `load_lora_adapter` of the export's LORA_WEIGHTS; returns (the family's net over it, its Family).

    Raises:
        ConfigError: the export was made from a teacher with another config.json (rcm.json records its SHA-256),
            or its adapters do not fit the teacher.
    """
    import json

    from rcm_core.export import config_sha256
    from rcm_core.teachers import CONFIG_NAME, detect_family, read_config

    recorded = None
    if (export_dir / "rcm.json").is_file():
        recorded = json.loads((export_dir / "rcm.json").read_text()).get("teacher", {}).get("config_sha256")
    if recorded and recorded != config_sha256(teacher_dir / CONFIG_NAME):
        raise ConfigError(f"--teacher: {teacher_dir} is not the teacher this LoRA was trained on (config.json differs)")
    family = detect_family(read_config(teacher_dir))
    module = family.diffusers_class().from_pretrained(str(teacher_dir), torch_dtype=torch.float32)
    try:
        module.load_lora_adapter(str(export_dir), prefix="transformer", weight_name=LORA_WEIGHTS)
    except (ValueError, RuntimeError) as exc:  # shapes or module names of another model
        reason = str(exc).splitlines()[0][:160]
        raise ConfigError(f"--teacher: the LoRA does not fit {teacher_dir} ({reason})") from None
    return family.build_net(module), family
