"""Local stack on loopback: SeaweedFS (S3), MLflow, a Ray head with the Jobs API, and the API under uvicorn.

    python scripts/stack.py up | down | status

State lives in one data directory (RCM_DATA_DIR, default .data/): databases, objects, logs, PID files,
generated credentials (stack.env) and the demo tenant's token (demo-token). `down` stops every process
by its PID (SIGTERM, then SIGKILL after a grace period); `up` again keeps all jobs and objects.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RCM_DATA_DIR", ROOT / ".data")).resolve()
BIN = Path(sys.executable).parent
PORTS = {"s3": 8333, "mlflow": 5000, "ray": 8265, "api": 8000}
ORDER = ["seaweedfs", "mlflow", "ray", "api"]


def _env() -> dict[str, str]:
    """Credentials generated once per data directory, plus the URLs every component uses."""
    path = DATA / "stack.env"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        path.write_text(f"S3_ACCESS_KEY=rcm{secrets.token_hex(8)}\nS3_SECRET_KEY={secrets.token_urlsafe(24)}\n")
        path.chmod(0o600)
    env = dict(line.split("=", 1) for line in path.read_text().split())
    return {
        **env,
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{PORTS['s3']}",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{PORTS['mlflow']}",
        "RAY_DASHBOARD_URL": f"http://127.0.0.1:{PORTS['ray']}",
        "DATABASE_URL": os.environ.get("DATABASE_URL", f"sqlite:///{DATA}/rcm.db"),
        "API_URL": f"http://127.0.0.1:{PORTS['api']}",
    }


def _pidfile(name: str) -> Path:
    return DATA / "pids" / f"{name}.pid"


def _alive(name: str) -> int | None:
    """The PID recorded for `name` if that process is running (a zombie awaiting its reaper counts as dead)."""
    try:
        pid = int(_pidfile(name).read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return pid  # no procfs (macOS): trust kill(0)
    return None if state in ("Z", "X") else pid


def _spawn(name: str, cmd: list[str], env: dict[str, str]) -> None:
    (DATA / "logs").mkdir(parents=True, exist_ok=True)
    (DATA / "pids").mkdir(parents=True, exist_ok=True)
    log = open(DATA / "logs" / f"{name}.log", "ab")  # noqa: SIM115  (handed to the child)
    # A new session: the process group can be signalled as a whole at `down`.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    _pidfile(name).write_text(str(proc.pid))


def _wait(name: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _alive(name) is None:
            raise SystemExit(f"stack: {name} exited during start-up; see {DATA / 'logs' / (name + '.log')}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001  (not up yet)
            pass
        time.sleep(0.5)
    raise SystemExit(f"stack: {name} not healthy after {timeout:.0f}s; see {DATA / 'logs' / (name + '.log')}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310  (loopback only)
        return r.status == 200


def s3_client(env: dict[str, str]):
    """A boto3 client of the stack's S3 (path-style addressing, as SeaweedFS needs)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        aws_access_key_id=env["S3_ACCESS_KEY"],
        aws_secret_access_key=env["S3_SECRET_KEY"],
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def _s3_ok(env: dict[str, str]) -> bool:
    names = {b["Name"] for b in s3_client(env).list_buckets()["Buckets"]}
    return {"ckpt", "mlflow"} <= names


def up() -> dict[str, str]:
    env = _env()
    base = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}  # Ray jobs resolve python from here
    if not _alive("seaweedfs"):
        (DATA / "s3").mkdir(parents=True, exist_ok=True)
        ident = {
            "identities": [
                {
                    "name": "svc",
                    "credentials": [{"accessKey": env["S3_ACCESS_KEY"], "secretKey": env["S3_SECRET_KEY"]}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        (DATA / "s3.json").write_text(json.dumps(ident))
        (DATA / "s3.json").chmod(0o600)
        (DATA / "wlog").mkdir(exist_ok=True)
        _spawn(
            "seaweedfs",
            [
                str(BIN / "weed"),
                f"-logdir={DATA / 'wlog'}",
                "mini",
                f"-dir={DATA / 's3'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-s3.config={DATA / 's3.json'}",
                "-master.telemetry=false",
                "-admin.ui=false",
                "-webdav=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-bucket=ckpt,mlflow",
            ],
            base,
        )
    _wait("seaweedfs", lambda: _s3_ok(env), 60)
    print(f"stack: S3 (SeaweedFS) on {env['S3_ENDPOINT_URL']}", flush=True)

    if not _alive("mlflow"):
        menv = {
            **base,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_S3_ENDPOINT_URL": env["S3_ENDPOINT_URL"],
            "AWS_ACCESS_KEY_ID": env["S3_ACCESS_KEY"],
            "AWS_SECRET_ACCESS_KEY": env["S3_SECRET_KEY"],
        }
        _spawn(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{DATA}/mlflow.db",
                "--artifacts-destination",
                "s3://mlflow/artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(PORTS["mlflow"]),
                "--workers",
                "1",
            ],
            menv,
        )
    _wait("mlflow", lambda: _http_ok(env["MLFLOW_TRACKING_URI"] + "/health"), 120)
    print(f"stack: MLflow on {env['MLFLOW_TRACKING_URI']}", flush=True)

    if not _alive("ray"):
        # The S3 keys live in the Ray node's environment (inherited by every job and worker), never in a
        # job's runtime_env, which Ray's dashboard shows to anyone who can read it.
        renv = {
            **base,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
            "MLFLOW_S3_ENDPOINT_URL": env["S3_ENDPOINT_URL"],
            "AWS_ACCESS_KEY_ID": env["S3_ACCESS_KEY"],
            "AWS_SECRET_ACCESS_KEY": env["S3_SECRET_KEY"],
            # jobs may name a prompt file by a path relative to this directory (data.prompt_file_uri)
            "RCM_PROMPT_DIR": str(DATA / "prompts"),
        }
        (DATA / "prompts").mkdir(parents=True, exist_ok=True)
        _spawn(
            "ray",
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                "--num-cpus=2",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                f"--temp-dir={DATA / 'ray'}",
                "--disable-usage-stats",
            ],
            renv,
        )
    _wait("ray", lambda: _http_ok(env["RAY_DASHBOARD_URL"] + "/api/version"), 120)
    print(f"stack: Ray head, Jobs API on {env['RAY_DASHBOARD_URL']}", flush=True)

    if not _alive("api"):
        aenv = {
            **base,
            **{
                k: env[k]
                for k in (
                    "S3_ACCESS_KEY",
                    "S3_SECRET_KEY",
                    "S3_ENDPOINT_URL",
                    "MLFLOW_TRACKING_URI",
                    "RAY_DASHBOARD_URL",
                    "DATABASE_URL",
                )
            },
        }
        _spawn(
            "api", [str(BIN / "uvicorn"), "service.main:app", "--host", "127.0.0.1", "--port", str(PORTS["api"])], aenv
        )
    _wait("api", lambda: _http_ok(env["API_URL"] + "/healthz"), 60)
    token_file = DATA / "demo-token"
    if not token_file.exists():
        out = subprocess.run(
            [sys.executable, "-m", "service.admin", "create-token", "--tenant", "demo"],
            env={
                **base,
                "DATABASE_URL": env["DATABASE_URL"],
                **{k: env[k] for k in ("S3_ACCESS_KEY", "S3_SECRET_KEY")},
            },
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        token_file.write_text(out.stdout.strip())
        token_file.chmod(0o600)
    print(f"stack: API on {env['API_URL']} (docs: {env['API_URL']}/docs); token in {token_file}", flush=True)
    return env


def down() -> None:
    for name in reversed(ORDER):
        pid = _alive(name)
        if pid is None:
            continue
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(name):
            time.sleep(0.3)
        if _alive(name):
            os.killpg(pid, signal.SIGKILL)
        _pidfile(name).unlink(missing_ok=True)
        print(f"stack: stopped {name} (pid {pid})", flush=True)


def status() -> int:
    for name in ORDER:
        pid = _alive(name)
        print(f"{name:10s} {'running, pid ' + str(pid) if pid else 'stopped'}")
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "up":
        up()
    elif cmd == "down":
        down()
    elif cmd == "status":
        status()
    else:
        print("usage: stack.py up|down|status", file=sys.stderr)
        sys.exit(2)
