"""The text encoder and VAE of a teacher's diffusers pipeline directory, used the way the pipeline uses them.

A pipeline directory is what `DiffusionPipeline.save_pretrained` writes: `model_index.json` naming each component's
(library, class), and one folder per component (`tokenizer/`, `text_encoder/`, `vae/`, `transformer/`, ...).
Supported pipelines (diffusers 0.42.1):
- `WanPipeline` (Wan2.1 T2V): tokenizer + transformers `UMT5EncoderModel`, VAE `AutoencoderKLWan`. Prompts are
  cleaned with the pipeline's own `prompt_clean` (ftfy when installed, HTML unescape, whitespace) before tokenizing.
- `Cosmos2TextToImagePipeline` / `Cosmos2VideoToWorldPipeline` (Cosmos-Predict2): tokenizer + `T5EncoderModel`,
  VAE `AutoencoderKLWan` (the same Wan VAE). Prompts are tokenized as given.
Prompt encoding follows the pipelines' `_get_t5_prompt_embeds`: tokenize to `max_sequence_length` (512 at call
time in both) with truncation and max-length padding, run the encoder with the attention mask, cast to the
encoder's dtype, and zero every position past the prompt's real length (Wan truncates and zero-pads; Cosmos
zeroes in place: the same tensor). Latents follow the pipelines' normalisation: the posterior's mode,
`(z - latents_mean) / latents_std` with the VAE config's per-channel statistics (Cosmos also multiplies by its
scheduler's sigma_data, 1.0), the inverse of what the pipelines apply before `vae.decode`.
Unsupported: video files (give a folder of frames), Wan2.2 (its patchified VAE), image-conditioned pipelines.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rcm_core.config import ConfigError

MODEL_INDEX = "model_index.json"
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # what WanPipeline.__call__ and the Cosmos2 pipelines pass to encode_prompt


@dataclass(frozen=True)
class PipelineKind:
    """What this project knows about one diffusers pipeline class."""

    family: str  # rcm_core.teachers family of its transformer
    encoder_classes: tuple[str, ...]  # transformers classes its text_encoder may be
    clean_prompts: bool  # Wan's prompt_clean before tokenizing
    bool_mask: bool  # Cosmos passes the attention mask as bool, Wan as the tokenizer's integers
    sigma_data: float  # Cosmos scales normalised latents by its scheduler's sigma_data (1.0); Wan does not
    negative_prompt: str  # the pipeline's default negative prompt ("" for Wan)


def _cosmos_negative_prompt() -> str:
    from diffusers.pipelines.cosmos.pipeline_cosmos2_text2image import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT


PIPELINES: dict[str, dict[str, Any]] = {
    "WanPipeline": dict(family="wan2.1", encoder_classes=("UMT5EncoderModel",), clean_prompts=True, bool_mask=False),
    "Cosmos2TextToImagePipeline": dict(
        family="cosmos-predict2", encoder_classes=("T5EncoderModel",), clean_prompts=False, bool_mask=True
    ),
    "Cosmos2VideoToWorldPipeline": dict(
        family="cosmos-predict2", encoder_classes=("T5EncoderModel",), clean_prompts=False, bool_mask=True
    ),
}
VAE_CLASSES = ("AutoencoderKLWan",)


def read_model_index(path: str | Path) -> dict:
    index_path = Path(path) / MODEL_INDEX
    if not index_path.is_file():
        raise ConfigError(f"--pipeline: {path} is not a diffusers pipeline directory (no {MODEL_INDEX})")
    try:
        index = json.loads(index_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"--pipeline: {index_path} is not valid JSON") from None
    if not isinstance(index, dict):
        raise ConfigError(f"--pipeline: {index_path} is not a JSON object")
    return index


def pipeline_kind(index: dict) -> PipelineKind:
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ConfigError(
            f"--pipeline: _class_name {str(name)[:64]!r} in {MODEL_INDEX} is not supported; supported: "
            + ", ".join(PIPELINES)
        )
    neg = _cosmos_negative_prompt() if PIPELINES[name]["family"] == "cosmos-predict2" else ""
    return PipelineKind(**PIPELINES[name], sigma_data=1.0, negative_prompt=neg)


def _component(index: dict, name: str, allowed: tuple[str, ...], library: str) -> str:
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] is not None):
        raise ConfigError(f"--pipeline: {MODEL_INDEX} has no {name} component")
    if entry[0] != library or entry[1] not in allowed:
        raise ConfigError(f"--pipeline: {name} is {entry[0]}.{entry[1]}; supported: {', '.join(allowed)}")
    return entry[1]


def _sha256_of(folder: Path, names: tuple[str, ...]) -> str:
    """sha256 over the named files that exist in `folder` (name and bytes): a component's identity."""
    h = hashlib.sha256()
    for name in names:
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def component_identity(path: Path, index: dict, name: str, cls: str) -> dict[str, Any]:
    """Class, component, source (hub id or local folder) and config hash of one pipeline component."""
    folder = path / name
    # the hub id when the pipeline was saved from one (diffusers records _name_or_path), else the local folder
    source = index.get("_name_or_path") or str(path.resolve())
    return {"class": cls, "component": name, "source": source, "config_sha256": _sha256_of(folder, ("config.json",))}


def _quiet_loading() -> None:
    """No weight-loading progress bars or info chatter from transformers / diffusers: the command prints its own
    progress lines, and its stderr stays one line on an error."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()


def _load_error(name: str, path: Path, exc: Exception) -> ConfigError:
    # one line naming the component; the library's message may hold a long path or repository hint, keep it short
    return ConfigError(f"--pipeline: cannot load {name} from {path / name} ({type(exc).__name__})")


class TextEncoder:
    """The pipeline's tokenizer + text encoder; `encode(prompts)` -> ((B, L, D) tokens, (B,) real lengths)."""

    def __init__(self, path: str | Path, *, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH, dtype=None,
                 device: str | torch.device = "cpu"):  # fmt: skip
        import transformers

        _quiet_loading()
        path = Path(path)
        index = read_model_index(path)
        self.kind = pipeline_kind(index)
        cls = _component(index, "text_encoder", self.kind.encoder_classes, "transformers")
        if max_sequence_length < 1:
            raise ConfigError(f"--max-sequence-length: must be >= 1, got {max_sequence_length}")
        self.max_sequence_length = max_sequence_length
        self.device = torch.device(device)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        except (OSError, ValueError) as exc:
            raise _load_error("tokenizer", path, exc) from None
        kwargs = {} if dtype is None else {"dtype": dtype}
        try:
            model = getattr(transformers, cls).from_pretrained(str(path / "text_encoder"), **kwargs)
        except (OSError, ValueError) as exc:
            raise _load_error("text_encoder", path, exc) from None
        self.model = model.to(self.device).eval()
        self.dtype = self.model.dtype
        self.dim = int(self.model.config.d_model)
        tokenizer_files = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")
        self.identity = {
            **component_identity(path, index, "text_encoder", cls),
            "pipeline": index["_class_name"],
            "family": self.kind.family,
            "tokenizer": {
                "class": type(self.tokenizer).__name__,
                "sha256": _sha256_of(path / "tokenizer", tokenizer_files),
            },  # fmt: skip
            "max_sequence_length": max_sequence_length,
            "dtype": str(self.dtype).removeprefix("torch."),
            "prompt_clean": self.kind.clean_prompts,
        }

    def prepare_text(self, prompts: list[str]) -> list[str]:
        if not self.kind.clean_prompts:
            return list(prompts)
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        return [prompt_clean(p) for p in prompts]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (tokens (B, max_sequence_length, D) in the encoder's dtype, padding zero; lengths (B,) int64)."""
        length = self.max_sequence_length
        batch = self.tokenizer(
            self.prepare_text(prompts),
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = batch.attention_mask.bool() if self.kind.bool_mask else batch.attention_mask
        hidden = self.model(input_ids=batch.input_ids.to(self.device), attention_mask=mask.to(self.device))
        tokens = hidden.last_hidden_state.to(self.dtype)  # (B, L, D)
        lengths = batch.attention_mask.gt(0).sum(dim=1).long()  # (B,)
        keep = torch.arange(length)[None, :] < lengths[:, None]  # (B, L)
        # where, not multiply: a padded position's value (even inf/nan) must not leak into the zero padding
        return torch.where(keep[..., None].to(tokens.device), tokens, torch.zeros((), dtype=tokens.dtype)), lengths


class LatentEncoder:
    """The pipeline's VAE; `encode(pixels (B, 3, F, H, W) in [-1, 1])` -> normalised latents (B, C, F', H', W')."""

    def __init__(self, path: str | Path, *, dtype=None, device: str | torch.device = "cpu"):
        import diffusers

        _quiet_loading()
        path = Path(path)
        index = read_model_index(path)
        self.kind = pipeline_kind(index)
        cls = _component(index, "vae", VAE_CLASSES, "diffusers")
        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        try:
            vae = getattr(diffusers, cls).from_pretrained(str(path / "vae"), **kwargs)
        except (OSError, ValueError) as exc:
            raise _load_error("vae", path, exc) from None
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval()
        cfg = self.vae.config
        if getattr(cfg, "patch_size", None):
            raise ConfigError("--pipeline: a patchified Wan VAE (Wan2.2) is not supported")
        self.channels = int(cfg.z_dim)
        self.temporal_factor = 2 ** sum(cfg.temperal_downsample)  # frames 1 + k * factor -> 1 + k latent frames
        if self.temporal_factor != 4:
            # AutoencoderKLWan._encode feeds frames in chunks of 1 + 4k whatever its config says
            raise ConfigError(f"--pipeline: the VAE's temporal factor is {self.temporal_factor}; the Wan VAE needs 4")
        self.spatial_factor = 2 ** len(cfg.temperal_downsample)  # what WanPipeline uses as vae_scale_factor_spatial
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.identity = {
            **component_identity(path, index, "vae", cls),
            "normalisation": "(mode(z) - latents_mean) / latents_std * sigma_data",
            "sigma_data": self.kind.sigma_data,
            "dtype": str(self.vae.dtype).removeprefix("torch."),
        }

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (
            self.channels,
            1 + (frames - 1) // self.temporal_factor,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        z = posterior.mode().float().cpu()  # the mean: a deterministic latent per input
        return (z - self.mean) / self.std * self.kind.sigma_data


__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "LatentEncoder",
    "PIPELINES",
    "PipelineKind",
    "component_identity",
    "TextEncoder",
    "pipeline_kind",
    "read_model_index",
]
