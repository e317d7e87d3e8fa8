"""The real app under uvicorn in a child process, for tests that need real sockets and real concurrency.

Each `LiveApi` takes an ephemeral loopback port (uvicorn binds port 0 and logs the port it got), its own
SQLite file and its own tokens. The cluster backend is the real `RayCluster`, pointed at loopback ports
that are bound but never listen: Ray, MLflow and S3 are "down" (connection refused at once), which is the
narrowest real setting for the request-handling tests, which need none of them (jobs stay QUEUED).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[2]
_STARTED = re.compile(rb"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def _closed_port() -> socket.socket:
    """A loopback port that refuses connections for as long as the returned socket stays open (bound, no listen)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


class LiveApi:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, tenants: tuple[str, ...] = ("a", "b")):
        self.data_dir = data_dir
        self._dead = [_closed_port() for _ in range(3)]
        ray, mlflow, s3 = (f"http://127.0.0.1:{s.getsockname()[1]}" for s in self._dead)
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": f"sqlite:///{data_dir}/rcm.db",
            "S3_ACCESS_KEY": "test-access",
            "S3_SECRET_KEY": "test-secret",
            "RAY_DASHBOARD_URL": ray,
            "MLFLOW_TRACKING_URI": mlflow,
            "S3_ENDPOINT_URL": s3,
            "ENVIRONMENT": "test",
            **(env or {}),
        }
        self.tokens = {t: self._create_token(f"tenant-{t}") for t in tenants}
        self.log_path = data_dir / "api.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def _create_token(self, tenant: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "service.admin", "create-token", "--tenant", tenant],
            cwd=self.data_dir,  # a .env in the repository root must not leak into the test's settings
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return out.stdout.strip()

    def start(self, timeout_s: float = 60.0) -> LiveApi:
        log = open(self.log_path, "wb")  # noqa: SIM115  (handed to the child)
        cmd = [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(cmd, cwd=self.data_dir, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = _STARTED.search(self.log_path.read_bytes())
            if m:
                self.url = f"http://127.0.0.1:{int(m.group(1))}"
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited during start-up:\n{self.log_text()}")
            time.sleep(0.1)
        raise RuntimeError(f"uvicorn did not start in {timeout_s} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        for s in self._dead:
            s.close()

    def headers(self, tenant: str = "a", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[tenant]}", **extra}

    def client(self, timeout: float = 10.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def metric(self, name: str) -> float:
        """One gauge from the app's /metrics (Prometheus text format)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        if m is None:
            raise AssertionError(f"{name} not in /metrics:\n{text}")
        return float(m.group(1))


def run_in_threads(fn, n: int) -> list:
    """Call `fn(i)` for i in range(n) on n threads released together; results (or exceptions) in order."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001  (handed back to the test to assert on)
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def teacher_uri(tenant: str = "a") -> str:
    """A teacher URI inside `tenant-<tenant>`'s own input prefix (service/inputs.py), so a job spec passes the
    tenant check; nothing is read from it in these tests (no job ever reaches a worker)."""
    return f"s3://ckpt/tenants/tenant-{tenant}/t.safetensors"
