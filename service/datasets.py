"""Submission checks of a stored dataset (data.uri s3://bucket/prefix/, format rcm-latents-v1: Parquet shards and a
manifest.json written last, rcm_core/data/latent_shards.py) for a diffusers teacher. After the tenant-prefix check
(service/inputs.py) and the teacher folder's own checks (service/teachers.py), the API reads the manifest
(size-capped; the shards are never read here) and refuses with a 422 naming the field:
- body.data.uri: no manifest.json (an unfinished dataset or none), not rcm-latents-v1, malformed; its text.dim is
  not the teacher config's text_dim (Wan) / text_embed_dim (Cosmos); its latent shape does not fit in_channels /
  patch_size / RoPE positions; a prompts-only dataset with the sCM term on;
- body.data.latent_shape: given and not the dataset's, or missing with a prompts-only dataset (the noise's shape);
- body.resources.cp_degree: as for the teacher (Ulysses), with the dataset's latent.
Stdlib only (the API image has no torch); the worker's entrypoint applies the same rules again (workers/datasets.py,
rcm_core.tasks.diffusers). Messages never quote the file.
"""

from __future__ import annotations

import json
from typing import Any

from service.schemas import JobCreate
from service.teachers import Errors, _error, _positive_ints, shape_errors

FORMAT = "rcm-latents-v1"
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists shards (~40 bytes each): 1 MiB is ~25k shards
TEXT_DIM_KEYS = ("text_dim", "text_embed_dim")  # Wan, Cosmos (rcm_core.tasks.diffusers.TEXT_DIM_KEYS)


def manifest_key(uri: str) -> tuple[str, str]:
    """(bucket, key) of the dataset's manifest."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix + MANIFEST_NAME


def dataset_errors(spec: JobCreate, raw: bytes | None, config: dict[str, Any]) -> Errors:
    """422 errors for the stored dataset of `spec` given its manifest's bytes (None: there is none) and the
    teacher's parsed config.json."""
    uri, loc_uri = spec.data.uri, ("body", "data", "uri")
    if raw is None:
        msg = f"no {MANIFEST_NAME} under it: not a finished {FORMAT} dataset (shards + {MANIFEST_NAME}, written last "
        return [_error(loc_uri, msg + "by `rcm data prepare`)", uri)]
    manifest = _parse(raw)
    if manifest is None:
        return [_error(loc_uri, f"its {MANIFEST_NAME} is not an {FORMAT} manifest", uri)]
    text, latent = manifest.get("text"), manifest.get("latent")
    if not (
        isinstance(text, dict)
        and _positive_ints([text.get("tokens"), text.get("dim"), manifest.get("count")])
        and (latent is None or isinstance(latent, dict) and _is_shape(latent.get("shape")))
    ):
        msg = f"its {MANIFEST_NAME} lacks a positive count, text.tokens, text.dim or a 4-entry latent.shape"
        return [_error(loc_uri, msg, uri)]
    errors: Errors = []
    want = next((config[k] for k in TEXT_DIM_KEYS if isinstance(config.get(k), int)), None)
    if want is not None and text["dim"] != want:
        key = next(k for k in TEXT_DIM_KEYS if config.get(k) == want)
        msg = f"the dataset's text.dim is {text['dim']} (its {MANIFEST_NAME}), but the teacher's {key} is {want} "
        errors.append(_error(loc_uri, msg + "(teacher.uri config.json): encode the prompts with its text encoder", uri))
    loc_shape, given = ("body", "data", "latent_shape"), spec.data.latent_shape
    if latent is None:  # prompts only: DMD only, the noise's shape from the spec
        if spec.method.scm_weight != 0:
            msg = "a prompts-only dataset (no latents): the sCM term needs data latents; set method.scm_weight to 0 "
            errors.append(_error(loc_uri, msg + "(DMD only) or fill them with `rcm data prepare --synthesize`", uri))
        if given is None:
            return errors + [_error(loc_shape, "required with a prompts-only dataset (the noise's shape)", given)]
        return errors + shape_errors(spec, config, list(given), loc_shape)
    shape = list(latent["shape"])
    if given is not None and list(given) != shape:
        errors.append(
            _error(loc_shape, f"{list(given)} is not the dataset's latent shape {shape} (leave it out)", given)
        )
    return errors + shape_errors(spec, config, shape, loc_uri, f"the dataset's latent shape {shape}: ")


def _parse(raw: bytes) -> dict[str, Any] | None:
    if len(raw) > MAX_MANIFEST_BYTES:
        return None
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 4 and _positive_ints(value)
