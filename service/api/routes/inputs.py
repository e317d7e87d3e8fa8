"""/v1/inputs: a tenant's input files (teachers, prompt files), written under its own S3 prefix by the service."""

from __future__ import annotations

import tempfile
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, status
from fastapi.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from service.api.deps import ClusterDep, TenantDep
from service.api.errors import error_responses
from service.inputs import INPUT_NAME, input_key, input_prefix_uri
from service.schemas import InputPublic
from service.settings import get_settings


class _AnyPath(Convertor[str]):
    """Like Starlette's `path`, but matching every character: its `.*` stops at a newline, so a name holding
    %0A fell through the router as an undocumented 404 instead of reaching the name check (422)."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", _AnyPath())
router = APIRouter(prefix="/v1/inputs", tags=["inputs"])
NameParam = Annotated[
    str,
    Path(
        pattern=INPUT_NAME.pattern,
        description="file name (letters, digits, . _ -), or a path of up to 8 such names (a teacher folder's file: "
        "wan/transformer/config.json)",
    ),
]
SPOOL_BYTES = 8 * 2**20  # uploads larger than this are buffered on disk, not in memory


# The body is read as a raw stream (never parsed or held in memory whole), so OpenAPI is told about it here.
_RAW_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.put(
    "/{name:anypath}",
    status_code=status.HTTP_201_CREATED,
    response_model=InputPublic,
    openapi_extra=_RAW_BODY,
    responses={**error_responses(401, 429, 503), 413: {"description": "the body is over MAX_INPUT_BYTES"}},
)
async def upload_input(name: NameParam, request: Request, tenant: TenantDep, cluster: ClusterDep) -> InputPublic:
    """Store the request body as this tenant's input `name` (replacing it); use the returned `uri` in a job."""
    settings = get_settings()
    size = 0
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as buf:
        async for chunk in request.stream():  # counted as it arrives: chunked bodies cannot skip the limit
            size += len(chunk)
            if size > settings.MAX_INPUT_BYTES:
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"input over {settings.MAX_INPUT_BYTES} bytes")
            buf.write(chunk)
        buf.seek(0)
        key = input_key(settings, tenant, name)
        await run_in_threadpool(cluster.put_input, settings.INPUTS_BUCKET, key, buf)
    return InputPublic(name=name, uri=f"s3://{settings.INPUTS_BUCKET}/{key}", size=size)


@router.get("", response_model=list[InputPublic], responses=error_responses(401, 429, 503))
def read_inputs(tenant: TenantDep, cluster: ClusterDep) -> list[InputPublic]:
    """This tenant's input files."""
    settings = get_settings()
    prefix = input_key(settings, tenant, "")
    base = input_prefix_uri(settings, tenant)
    return [
        InputPublic(name=o["key"].removeprefix(prefix), uri=base + o["key"].removeprefix(prefix), size=o["size"])
        for o in cluster.list_inputs(settings.INPUTS_BUCKET, prefix)
    ]


@router.delete("/{name:anypath}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(401, 429, 503))
def delete_input(name: NameParam, tenant: TenantDep, cluster: ClusterDep) -> None:
    """Delete this tenant's input `name` (jobs already running keep their own copy)."""
    settings = get_settings()
    cluster.delete_input(settings.INPUTS_BUCKET, input_key(settings, tenant, name))
