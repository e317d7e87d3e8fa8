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
