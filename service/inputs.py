"""Tenant-scoped inputs: every S3 object a job reads must lie under the caller's own input prefix.

A tenant's prefix is s3://INPUTS_BUCKET/INPUTS_PREFIX<tenant>/ (Settings). Files get there through
`PUT /v1/inputs/{name}` (the service writes them, so a tenant cannot place objects elsewhere), and a job spec
naming any other object (another tenant's inputs, exports, checkpoints, MLflow artifacts, another bucket) is
refused at submission with a 422 naming the field, before anything is read. Built-in teachers (builtin:NAME)
and prompt files from the cluster's operator-managed prompt directory (relative paths) are shared, read-only
data, not tenant objects.
"""

from __future__ import annotations

import re
from typing import Any

from service.schemas import JobCreate
from service.settings import Settings

# Input names: up to 8 path segments (a diffusers teacher is a folder: wan/transformer/config.json), each with
# no leading dot ('.', '..' and hidden names are refused) and S3-safe characters.
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9._\-]{0,127}"
INPUT_NAME = re.compile(rf"^(?:{_SEGMENT}/){{0,7}}{_SEGMENT}$")
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")  # no '/': one tenant's prefix never holds another's
# (location of the field in the request body, how to read it from the spec)
URI_FIELDS = (
    (("body", "teacher", "uri"), lambda spec: spec.teacher.uri),
    (("body", "data", "prompt_file_uri"), lambda spec: spec.data.prompt_file_uri),
    (("body", "data", "uri"), lambda spec: spec.data.uri),
)


def input_key(settings: Settings, tenant: str, name: str) -> str:
    """The S3 key of the tenant's input `name` (both already validated)."""
    return f"{settings.INPUTS_PREFIX}{tenant}/{name}"


def input_prefix_uri(settings: Settings, tenant: str) -> str:
    return f"s3://{settings.INPUTS_BUCKET}/{input_key(settings, tenant, '')}"


def inside(uri: str, prefix: str) -> bool:
    """Whether `uri` names an object (or a folder, one trailing /) under `prefix`, with no empty, . or .. segment."""
    if not uri.startswith(prefix):
        return False
    rest = uri.removeprefix(prefix)
    rest = (rest[:-1] if rest.endswith("/") else rest).split("/")  # one trailing '/': a folder (diffusers teacher)
    return all(part not in ("", ".", "..") for part in rest)  # no empty, '.' or '..' segment to confuse a reader


def input_errors(spec: JobCreate, tenant: str, settings: Settings) -> list[dict[str, Any]]:
    """Validation errors (FastAPI's 422 format) for every s3:// URI of `spec` outside the tenant's prefix, and for
    a registered model name outside the tenant's namespace (`<tenant>.<model>`)."""
    prefix, errors = input_prefix_uri(settings, tenant), []
    for loc, read in URI_FIELDS:
        value = read(spec)
        if value is None or not value.startswith("s3://") or inside(value, prefix):
            continue  # builtin: teachers and the prompt directory are checked by the schema
        errors.append(
            {
                "type": "value_error",
                "loc": loc,
                "msg": f"Value error, must be an object under your input prefix {prefix} "
                "(upload it with PUT /v1/inputs/NAME)",
                "input": value,
            }
        )
    name = spec.export.registered_model_name
    if name is not None and not _own_model(name, tenant):
        errors.append(
            {
                "type": "value_error",
                "loc": ("body", "export", "registered_model_name"),
                "msg": f"Value error, must be {tenant}.<model> (your tenant's namespace in the model registry)",
                "input": name,
            }
        )
    return errors


def _own_model(name: str, tenant: str) -> bool:
    # the model part has no '.', so "<tenant>." is unambiguous even for tenant names with dots
    model = name.removeprefix(f"{tenant}.")
    return model != name and "." not in model
