"""Client of the rcm-distill REST API (httpx only): `RcmClient` and the job commands of the `rcm` CLI."""

from rcm_client.client import ApiError, RcmClient

__all__ = ["ApiError", "RcmClient"]
