"""Submission checks of a diffusers teacher (teacher.uri s3://bucket/prefix/, a transformer folder): before a job
is queued, the API reads the folder's config.json (from the caller's own input prefix, size-capped) and refuses
with a 422 naming the field what the workers would refuse only minutes later:
- body.teacher.uri: no config.json (not a diffusers transformer folder), no safetensors weights, not a JSON
  object, an unsupported `_class_name`, or a variant its family does not support (Wan image-to-video and
  first-last-frame, Cosmos Video2World / 2.5);
- body.teacher.family: the family the spec names loads another class than config.json's;
- body.data.latent_shape: C is not in_channels, or (F, H, W) not divisible by patch_size (data.dataset latents:
  the dataset's manifest gives the shape, checked by service/datasets.py);
- body.resources.cp_degree: Ulysses needs num_attention_heads and the latent's tokens divisible by cp_degree;
- body.student.lora.target_modules.<i>: a LoRA target that is no block linear of the teacher's family.
Messages never quote the file (a tenant's own file, but an error body is no way to read files back).

The API image has no torch or diffusers, so `FAMILY_CLASSES` mirrors rcm_core.teachers.FAMILIES (the class each
family loads; tests/teachers/test_service_families.py checks that the two agree) and the rules mirror
rcm_core.tasks.diffusers.check_teacher_config, which the worker's entrypoint applies again.
"""

from __future__ import annotations

import json
import math
from typing import Any

from service.schemas import JobCreate

FAMILY_CLASSES = {"wan2.1": "WanTransformer3DModel", "cosmos-predict2": "CosmosTransformer3DModel"}
# the block linears a LoRA student may adapt, per family (rcm_core.teachers.FAMILIES' lora_targets; the test above
# checks they agree): both attentions' projections or one attention's, and the feed-forward's two linears
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TARGETS = {
    family: (*_ATTENTION, *(f"attn{i}.{n}" for i in (1, 2) for n in _ATTENTION), f"{ffn}.net.0.proj", f"{ffn}.net.2")
    for family, ffn in (("wan2.1", "ffn"), ("cosmos-predict2", "ff"))
}
CONFIG_NAME = "config.json"
# the weights from_pretrained reads: one file, or shards named by an index (the worker checks the shards)
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
MAX_CONFIG_BYTES = 1 << 20  # a transformer's config.json is under 2 KiB; anything larger is not one
SUPPORTED = ", ".join(f"{cls} ({fam})" for fam, cls in FAMILY_CLASSES.items())
# config.json keys that mark variants a family does not support: (family, key, what it means). A key counts when
# present and not null (Wan: image-to-video adds an image projection, FLF2V a position embedding;
# Cosmos-Predict2.5 an image context).
UNSUPPORTED_VARIANTS = (
    ("wan2.1", "image_dim", "a Wan image-to-video transformer (image_dim is set); wan2.1 is text-to-video"),
    ("wan2.1", "added_kv_proj_dim", "a Wan image-to-video transformer (added_kv_proj_dim is set)"),
    ("wan2.1", "pos_embed_seq_len", "a Wan first-last-frame-to-video transformer (pos_embed_seq_len is set)"),
    ("cosmos-predict2", "img_context_dim_in", "a Cosmos-Predict2.5 / Transfer transformer (img_context_dim_in)"),
)

Errors = list[dict[str, Any]]


def folder_key(uri: str) -> tuple[str, str]:
    """(bucket, key prefix ending in /) of the teacher folder `uri` (s3://bucket/prefix/)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix


def _error(loc: tuple[str | int, ...], msg: str, value: Any) -> dict[str, Any]:
    return {"type": "value_error", "loc": loc, "msg": f"Value error, {msg}", "input": value}


def teacher_errors(spec: JobCreate, raw: bytes | None, files: set[str]) -> Errors:
    """422 errors (FastAPI's format) for the diffusers teacher of `spec`, given its config.json's bytes (None:
    there is none) and the names of the files in its folder. `spec.teacher.uri` is a folder under the caller's
    prefix (checked before anything is read)."""
    uri, loc_uri = spec.teacher.uri, ("body", "teacher", "uri")
    if raw is None:
        msg = f"no {CONFIG_NAME} under it: not a diffusers transformer folder (the transformer/ folder save_pretrained "
        return [_error(loc_uri, msg + "writes; upload its files with PUT /v1/inputs/FOLDER/FILE)", uri)]
    if not files & set(WEIGHT_NAMES):
        msg = f"no weights under it ({' or '.join(WEIGHT_NAMES)} with its shards, as save_pretrained writes them)"
        return [_error(loc_uri, msg, uri)]
    config = parse_config(raw)
    if config is None:
        return [_error(loc_uri, f"its {CONFIG_NAME} is not a diffusers model config (a JSON object)", uri)]
    family = next((f for f, cls in FAMILY_CLASSES.items() if config.get("_class_name") == cls), None)
    if family is None:
        return [
            _error(loc_uri, f"the _class_name of its {CONFIG_NAME} is not a supported one; supported: {SUPPORTED}", uri)
        ]
    errors: Errors = []
    wanted = spec.teacher.family
    if wanted is not None and wanted != family:
        msg = f"{wanted!r} loads {FAMILY_CLASSES[wanted]}, but teacher.uri holds a {family} model "
        msg += f"({FAMILY_CLASSES[family]})"
        errors.append(_error(("body", "teacher", "family"), msg, wanted))
    for fam, key, what in UNSUPPORTED_VARIANTS:
        if fam == family and config.get(key) is not None:
            errors.append(_error(loc_uri, f"{what}: not supported (README: bring your own Wan / Cosmos teacher)", uri))
    if spec.student.lora is not None:
        targets = spec.student.lora.target_modules
        for i, name in enumerate(targets):
            if name not in LORA_TARGETS[family]:
                msg = f"{name!r} is not a block linear of the teacher ({family}); one of "
                msg += ", ".join(LORA_TARGETS[family])
                errors.append(_error(("body", "student", "lora", "target_modules", i), msg, name))
    if family == "cosmos-predict2" and config.get("in_channels") != config.get("out_channels"):
        what = "a Cosmos Video2World transformer (in_channels != out_channels: a condition-mask channel)"
        errors.append(_error(loc_uri, f"{what}: not supported, text-to-image/video only", uri))
    if spec.data.dataset != "teacher-synthetic":  # a stored dataset: its manifest's shape (service/datasets.py)
        return errors
    assert spec.data.latent_shape is not None  # the schema requires it with teacher-synthetic
    return errors + shape_errors(spec, config, spec.data.latent_shape, ("body", "data", "latent_shape"))


def shape_errors(
    spec: JobCreate, config: dict[str, Any], shape: list[int], loc_shape: tuple[str, ...], what: str = ""
) -> Errors:
    """A latent `shape` (named at `loc_shape`; `what` prefixes the messages) against in_channels and patch_size;
    cp_degree against heads and tokens (Ulysses)."""
    cp = spec.resources.cp_degree
    heads, patch, channels = config.get("num_attention_heads"), config.get("patch_size"), config.get("in_channels")
    loc_cp = ("body", "resources", "cp_degree")
    if not _positive_ints([heads, channels]) or not (
        isinstance(patch, list) and len(patch) == 3 and _positive_ints(patch)
    ):
        msg = f"its {CONFIG_NAME} lacks a positive num_attention_heads, in_channels or 3-entry patch_size"
        return [_error(("body", "teacher", "uri"), msg, spec.teacher.uri)]
    errors: Errors = []
    if shape[0] != channels:
        msg = f"{what}C = {shape[0]}, but the teacher takes in_channels = {channels}"
        errors.append(_error(loc_shape, msg, shape))
    if any(n % p for n, p in zip(shape[1:], patch, strict=True)):
        msg = f"{what}(F, H, W) = {tuple(shape[1:])} is not divisible by the teacher's patch_size {tuple(patch)}"
        return errors + [_error(loc_shape, msg, shape)]
    grid = [n // p for n, p in zip(shape[1:], patch, strict=True)]
    positions = rope_positions(config, patch)
    if positions is not None and max(grid) > positions:
        msg = f"{what}the latent's grid {tuple(grid)} after patch_size exceeds the teacher's {positions} RoPE positions"
        errors.append(
            _error(loc_shape, msg + " per axis (Wan: rope_max_seq_len; Cosmos: max_size / patch_size)", shape)
        )
    tokens = math.prod(grid)
    if heads % cp:
        msg = f"the teacher's num_attention_heads ({heads}) is not divisible by cp_degree ({cp}): Ulysses gives every"
        errors.append(_error(loc_cp, msg + " worker whole heads", cp))
    if tokens % cp:
        msg = f"the latent's {tokens} tokens (data.latent_shape / patch_size) are not divisible by cp_degree ({cp})"
        errors.append(_error(loc_cp, msg, cp))
    return errors


def rope_positions(config: dict[str, Any], patch: list[int]) -> int | None:
    """RoPE positions per axis of the patched grid: Wan's rope_max_seq_len, Cosmos's largest max_size / patch."""
    if isinstance(config.get("rope_max_seq_len"), int):
        return int(config["rope_max_seq_len"])
    size = config.get("max_size")
    if isinstance(size, list) and len(size) == 3 and _positive_ints(size):
        return max(m // p for m, p in zip(size, patch, strict=True))
    return None


def parse_config(raw: bytes) -> dict[str, Any] | None:
    if len(raw) > MAX_CONFIG_BYTES:
        return None
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _positive_ints(values: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
