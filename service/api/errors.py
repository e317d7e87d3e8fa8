"""Error responses: the documented error bodies per status code, and the handlers that produce them.

- 422 bodies never echo large or unencodable input: a request's `input` is kept only when small, with
  non-finite numbers spelled as strings and lone surrogates escaped, so the error itself can always be
  serialised (1e999, NaN, "n\\ud800" used to turn a 422 into a 500) and never mirrors a large body.
- Backends that do not answer (S3/Ray/MLflow, or no free job-store connection in time) give 503 with
  Retry-After instead of a 500 or an unbounded wait.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from service.cluster import ClusterUnavailable
from service.schemas import ErrorPublic

MAX_ECHO_CHARS = 64  # a string input longer than this is cut in a 422 body
MAX_ECHO_JSON_CHARS = 256  # an object/array input whose JSON is longer than this is left out of a 422 body
MAX_MESSAGE_CHARS = 512  # messages may quote the input (validators' f-strings): cut them too
CLUSTER_RETRY_AFTER_S = 5
POOL_RETRY_AFTER_S = 1

_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_DESCRIPTIONS: dict[int, str] = {
    400: "The body is not valid JSON text",
    401: "Missing or invalid bearer token",
    404: "No such job for this tenant (other tenants' jobs do not exist)",
    409: "The job is already in a terminal state",
    413: "Request body over MAX_BODY_BYTES (chunked bodies included); the connection is closed",
    429: "Per-tenant rate limit or open event-stream cap reached (both per API replica)",
    503: "A backend (object storage, Ray, MLflow) or the job store did not answer in time",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these status codes (422 keeps FastAPI's validation-error schema)."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorPublic, "description": _DESCRIPTIONS[code]}
        if code in (429, 503):
            entry["headers"] = _RETRY_AFTER
        out[code] = entry
    return out


def validation_error(loc: Sequence[str | int], msg: str, type_: str = "value_error") -> RequestValidationError:
    """A 422 in FastAPI's own shape (`detail: [{loc, msg, type}]`) for checks made in a route."""
    return RequestValidationError([{"loc": tuple(loc), "msg": msg, "type": type_}])


def _text(value: str, limit: int) -> str:
    value = value.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates -> "\ud800"
    return value if len(value) <= limit else value[:limit] + "..."


def _json_safe(value: Any) -> Any:
    """Finite numbers and valid UTF-8 only, so json.dumps(allow_nan=False) and UTF-8 encoding succeed."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return _text(value, MAX_ECHO_CHARS)
    if isinstance(value, dict):
        return {_text(str(k), MAX_ECHO_CHARS): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _text(str(value), MAX_ECHO_CHARS)  # exceptions in ctx, enums, ...


def _error_public(error: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "loc": [_text(p, MAX_ECHO_CHARS) if isinstance(p, str) else p for p in error.get("loc", ())],
        "msg": _text(str(error.get("msg", "")), MAX_MESSAGE_CHARS),
        "type": str(error.get("type", "value_error")),
    }
    if "input" in error:
        safe = _json_safe(error["input"])
        if len(json.dumps(safe)) <= MAX_ECHO_JSON_CHARS:  # large objects are left out, not cut into invalid JSON
            out["input"] = safe
    if isinstance(error.get("ctx"), dict):
        out["ctx"] = _json_safe(error["ctx"])
    return out


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = [_error_public(e) for e in exc.errors()]
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _cluster_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": str(exc)},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(CLUSTER_RETRY_AFTER_S)},
    )


async def _pool_timeout_handler(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(
        {"detail": "job store busy: no database connection free in time"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(POOL_RETRY_AFTER_S)},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(ClusterUnavailable, _cluster_unavailable_handler)
    app.add_exception_handler(PoolTimeoutError, _pool_timeout_handler)
