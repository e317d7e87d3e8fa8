"""A small Python client for the control plane's /v1 API."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

TERMINAL_STATES = {"SUCCEEDED", "FAILED", "CANCELLED"}


class ApiError(RuntimeError):
    """A non-2xx answer; `str()` is one readable line (422 errors list their field paths)."""

    def __init__(self, status: int, detail: Any):
        self.status, self.detail = status, detail
        if isinstance(detail, list):  # FastAPI validation errors
            text = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in detail)
        else:
            text = str(detail)
        super().__init__(f"HTTP {status}: {text}")


def default_token() -> str | None:
    token = os.environ.get("RCM_API_TOKEN")
    if token:
        return token
    path = Path(os.environ.get("RCM_DATA_DIR", ".data")) / "demo-token"  # written by `make up`
    return path.read_text().strip() if path.is_file() else None


class RcmClient:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 10.0):
        self.url = (url or os.environ.get("RCM_API_URL", "http://127.0.0.1:8000")).rstrip("/")
        token = token or default_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kw) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except (json.JSONDecodeError, AttributeError):
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r.json()

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=spec, headers=headers)

    def upload(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        """Upload a local file as one of this tenant's inputs; returns {name, uri, size}: put `uri` in a job spec
        (teacher.uri, data.prompt_file_uri)."""
        path = Path(path)
        with path.open("rb") as f:
            return self._call("PUT", f"/v1/inputs/{name or path.name}", content=f, timeout=None)

    def upload_folder(self, path: str | Path, name: str | None = None, *, recursive: bool = False) -> dict[str, Any]:
        """Upload the files of a local folder, e.g. a diffusers `transformer/` folder as save_pretrained writes it,
        as NAME/FILE (with `recursive`, sub-folders too, as NAME/SUB/FILE: a whole diffusers pipeline for
        POST /v1/datasets); returns {name, uri, size}: `uri` (ending in /) is the folder."""
        path = Path(path)
        folder = (name or path.name).strip("/")
        found = path.rglob("*") if recursive else path.iterdir()
        files = sorted(
            p for p in found if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
        )
        uploaded = [self.upload(f, f"{folder}/{f.relative_to(path).as_posix()}") for f in files]
        if not uploaded:
            raise ValueError(f"{path}: no files to upload")
        uri = uploaded[0]["uri"].removesuffix(files[0].relative_to(path).as_posix())
        return {"name": folder + "/", "uri": uri, "size": sum(u["size"] for u in uploaded)}

    def inputs(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/inputs")

    def jobs(self, *, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, **({"state": state} if state else {})}
        return self._call("GET", "/v1/jobs", params=params)["data"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel")

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/jobs/{job_id}/checkpoints")

    def samples(
        self,
        job_id: str,
        *,
        prompts: list[str] | None = None,
        prompt_embeds_uri: str | None = None,
        steps: int = 4,
        num_samples: int = 4,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Queue a preview of the job's latest checkpoint (POST /v1/jobs/{id}/samples): captions for a shapes job,
        an uploaded prompt-embeddings .safetensors URI for a diffusers job. Returns the request (its `id`, `state`)."""
        body: dict[str, Any] = {"steps": steps, "num_samples": num_samples, "seed": seed}
        body |= {"prompts": prompts} if prompts is not None else {"prompt_embeds_uri": prompt_embeds_uri}
        return self._call("POST", f"/v1/jobs/{job_id}/samples", json=body)

    def sample(self, job_id: str, sample_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}/samples/{sample_id}")

    def wait_sample(self, job_id: str, sample_id: str, *, timeout: float = 600.0, poll_s: float = 1.0) -> dict:
        """Poll a sample request until SUCCEEDED or FAILED (TimeoutError after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            sample = self.sample(job_id, sample_id)
            if sample["state"] in ("SUCCEEDED", "FAILED"):
                return sample
            if time.monotonic() > deadline:
                raise TimeoutError(f"sample request {sample_id} still {sample['state']} after {timeout:.0f} s")
            time.sleep(poll_s)

    def sample_file(self, job_id: str, sample_id: str, name: str = "grid.png") -> bytes:
        """A finished sample request's grid.png or samples.safetensors."""
        r = self.http.get(f"/v1/jobs/{job_id}/samples/{sample_id}/{name}", timeout=None)
        if r.status_code >= 400:
            raise ApiError(r.status_code, r.json().get("detail", r.text))
        return r.content

    def create_dataset(self, request: dict[str, Any]) -> dict[str, Any]:
        """Queue `rcm data prepare` on the cluster (POST /v1/datasets): {name, prompts: {uri}, pipeline: {uri},
        synthesize?, latent_shape?, ...}; the dataset's `uri` is what a job's data.uri takes once SUCCEEDED."""
        return self._call("POST", "/v1/datasets", json=request)

    def dataset(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/datasets/{name}")

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/jobs/{job_id}/events")

    def follow(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Server-sent events: the job's history, then live events until it ends.

        The server ends a stream after an idle period or a lifetime limit while the job may still run:
        reconnect from the last event id seen until the job is terminal (waiting Retry-After on a 429)."""
        last_id: int | None = None
        while True:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": str(last_id)} if last_id else {})}
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=None) as r:
                if r.status_code == 429:
                    time.sleep(float(r.headers.get("retry-after", "5")))
                    continue
                if r.status_code >= 400:
                    r.read()
                    raise ApiError(r.status_code, r.json().get("detail"))
                for line in r.iter_lines():
                    if line.startswith("id: "):
                        last_id = int(line[4:])
                    elif line.startswith("data: "):
                        yield json.loads(line[6:])
            if self.job(job_id)["state"] in TERMINAL_STATES:
                return
            time.sleep(1.0)  # the stream ended early (idle, lifetime or a busy server): reconnect, gently
