"""The real local stack for end-to-end tests: scripts/stack.py in a temporary data directory on free ports.

`running_stack(data)` starts SeaweedFS, MLflow, a Ray head and the API with RCM_STACK_PORTS=ephemeral, so a
demo stack (`make demo`, fixed ports 8333/5000/8265/8000) or another test stack can run at the same time, and
stops every process by PID at the end. The `Stack` it yields carries the URLs the stack chose, an S3 client
and the `stack.py` command (a test may kill a component and call `up` again: the ports stay the same).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

ROOT = Path(__file__).parents[2]


@dataclass
class Stack:
    data: Path
    env: dict[str, str]  # the environment stack.py runs with (RCM_DATA_DIR, RCM_STACK_PORTS)
    api: str  # http://127.0.0.1:<port>
    s3_url: str
    mlflow: str
    ray: str
    creds: dict[str, str]  # S3_ACCESS_KEY / S3_SECRET_KEY of this stack
    s3: Any = None
    tokens: dict[str, str] = field(default_factory=dict)  # tenant -> bearer token

    def cmd(self, action: str, timeout: float = 400) -> subprocess.CompletedProcess:
        """`python scripts/stack.py <action>` on this stack's data directory."""
        return subprocess.run(
            [sys.executable, "scripts/stack.py", action],
            cwd=ROOT,
            env=self.env,
            timeout=timeout,
            capture_output=True,
            text=True,
        )

    def pid(self, component: str) -> int:
        return int((self.data / "pids" / f"{component}.pid").read_text())

    def create_token(self, tenant: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "service.admin", "create-token", "--tenant", tenant],
            cwd=ROOT,
            env={
                **self.env,
                "DATABASE_URL": f"sqlite:///{self.data}/rcm.db",
                "S3_ACCESS_KEY": "x",
                "S3_SECRET_KEY": "x",
            },
            capture_output=True,
            text=True,
            check=True,
        )
        self.tokens[tenant] = out.stdout.strip()
        return self.tokens[tenant]


def stack_env(data: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "RCM_DATA_DIR": str(data), "RCM_STACK_PORTS": "ephemeral", **extra}
    env.pop("DATABASE_URL", None)
    return env


def s3_client(url: str, creds: dict[str, str]):
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=creds["S3_ACCESS_KEY"],
        aws_secret_access_key=creds["S3_SECRET_KEY"],
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


@contextmanager
def running_stack(data: Path, **extra_env: str) -> Iterator[Stack]:
    """Start the stack in `data` (extra_env: e.g. API settings), yield it, stop it (also when start-up fails)."""
    env = stack_env(data, **extra_env)
    stack: Stack | None = None
    try:
        up = subprocess.run(
            [sys.executable, "scripts/stack.py", "up"], cwd=ROOT, env=env, timeout=400, capture_output=True, text=True
        )
        assert up.returncode == 0, up.stdout + up.stderr
        urls = json.loads((data / "endpoints.json").read_text())
        creds = dict(line.split("=", 1) for line in (data / "stack.env").read_text().split())
        stack = Stack(
            data=data,
            env=env,
            api=urls["API_URL"],
            s3_url=urls["S3_ENDPOINT_URL"],
            mlflow=urls["MLFLOW_TRACKING_URI"],
            ray=urls["RAY_DASHBOARD_URL"],
            creds=creds,
        )
        stack.s3 = s3_client(stack.s3_url, creds)
        stack.tokens["demo"] = (data / "demo-token").read_text().strip()
        yield stack
    finally:
        down = subprocess.run(
            [sys.executable, "scripts/stack.py", "down"], cwd=ROOT, env=env, timeout=200, capture_output=True, text=True
        )
        print(down.stdout, down.stderr)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_s3(data: Path) -> Iterator[tuple[str, dict[str, str], Any]]:
    """SeaweedFS alone (`weed mini`, every port free), for tests of one module against real S3.

    Yields (endpoint URL, {"S3_ACCESS_KEY", "S3_SECRET_KEY"}, boto3 client); buckets ckpt and mlflow exist.
    """
    import secrets
    import signal
    import time

    creds = {"S3_ACCESS_KEY": "t" + secrets.token_hex(8), "S3_SECRET_KEY": secrets.token_hex(16)}
    ident = {
        "identities": [
            {
                "name": "t",
                "credentials": [{"accessKey": creds["S3_ACCESS_KEY"], "secretKey": creds["S3_SECRET_KEY"]}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    (data / "wlog").mkdir(parents=True, exist_ok=True)
    (data / "s3.json").write_text(json.dumps(ident))
    ports = {k: _free_port() for k in ("s3", "master", "volume", "filer", "admin")}
    grpc = {k: _free_port() for k in ports}
    flags = [f"-{k}.port={v}" for k, v in ports.items()] + [f"-{k}.port.grpc={v}" for k, v in grpc.items()]
    cmd = [str(Path(sys.executable).parent / "weed"), f"-logdir={data / 'wlog'}", "mini", f"-dir={data / 'sw'}"]
    cmd += ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={data / 's3.json'}", "-master.telemetry=false"]
    cmd += ["-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-bucket=ckpt,mlflow"]
    log = open(data / "weed.log", "wb")  # noqa: SIM115  (handed to the child)
    proc = subprocess.Popen(cmd + flags, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['s3']}"
    client = s3_client(url, creds)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if {"ckpt", "mlflow"} <= {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    break
            except Exception:  # noqa: BLE001  (not up yet)
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (data / "weed.log").read_text()[-2000:]
            time.sleep(0.3)
        yield url, creds, client
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def train_small_teacher(out: Path) -> Path:
    """A small real 2-D teacher (`rcm teacher train`, 400 steps: a few seconds on a CPU); returns its file."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "rcm_core.cli",
            "teacher",
            "train",
            "--set",
            "teacher.train_steps=400",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return next((out / "teachers").glob("*.safetensors"))
