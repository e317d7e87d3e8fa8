"""Local stack on loopback: SeaweedFS (S3), MLflow, a Ray head with the Jobs API, and the API under uvicorn.

    python scripts/stack.py up | down | status

State lives in one data directory (RCM_DATA_DIR, default .data/): databases, objects, logs, PID files,
generated credentials (stack.env), the ports in use (ports.json), the URLs (endpoints.json) and the demo
tenant's token (demo-token). `down` stops every process by its PID (SIGTERM, then SIGKILL after a grace
period); `up` again keeps all jobs and objects, on the same ports.

Ports: the demo (`make demo`, `make up`) listens on the fixed defaults below (S3 8333, MLflow 5000, Ray Jobs
API 8265, API 8000). With RCM_STACK_PORTS=ephemeral (the tests) a new data directory gets free ports chosen by
the OS for every listening socket of every component, so a test stack runs beside a demo stack (or another
test stack). Before a component starts, each of its ports is checked: a taken port stops `up` with a message
naming the port and the process that holds it.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RCM_DATA_DIR", ROOT / ".data")).resolve()
BIN = Path(sys.executable).parent
ORDER = ["seaweedfs", "mlflow", "ray", "api"]
# Every TCP port each component listens on, with the demo's value; None: the component picks a free one itself
# unless the stack is ephemeral. SeaweedFS mini's gRPC ports default to the HTTP port + 10000 and its admin
# server listens even with the admin UI off.
DEFAULT_PORTS: dict[str, dict[str, int | None]] = {
    "seaweedfs": {
        "s3": 8333,
        "s3_grpc": 18333,
        "master": 9333,
        "master_grpc": 19333,
        "volume": 9340,
        "volume_grpc": 19340,
        "filer": 8888,
        "filer_grpc": 18888,
        "admin": 23646,
        "admin_grpc": 33646,
    },
    "mlflow": {"mlflow": 5000},
    "ray": {
        "ray_dashboard": 8265,  # the Jobs REST API
        "ray_gcs": 6379,
        "ray_client": 10001,
        "ray_agent": 52365,
        "ray_agent_grpc": None,
        "ray_runtime_env": None,
        "ray_metrics": None,
        "ray_object_manager": None,
        "ray_node_manager": None,
    },
    "api": {"api": 8000},
}
PORTS = {"s3": 8333, "mlflow": 5000, "ray": 8265, "api": 8000}  # the demo's public ports (README)


def _free_port() -> int:
    """A port free on 127.0.0.1 now, below the kernel's ephemeral range (released at once: the component binds it
    a moment later). Below that range no outgoing connection is given it as its local port, so it stays free
    while a component restarts; the OS's own choice (port 0) comes from that range and could be taken meanwhile.
    """
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; macOS has no procfs (its range starts at 49152)
    for _ in range(200):
        port = random.randint(15000, low - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # crowded: let the OS choose
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ports() -> dict[str, int | None]:
    """The data directory's ports: chosen at its first `up` (fixed or ephemeral), then kept in ports.json."""
    path = DATA / "ports.json"
    if path.exists():
        return json.loads(path.read_text())
    mode = os.environ.get("RCM_STACK_PORTS", "fixed")
    if mode not in ("fixed", "ephemeral"):
        raise SystemExit(f"stack: RCM_STACK_PORTS must be 'fixed' or 'ephemeral', not {mode!r}")
    flat = {k: v for group in DEFAULT_PORTS.values() for k, v in group.items()}
    if mode == "ephemeral":
        chosen: set[int] = set()
        for k in flat:
            while (p := _free_port()) in chosen:
                pass
            chosen.add(p)
            flat[k] = p
    DATA.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**flat, "mode": mode}, indent=1))
    return flat | {"mode": mode}  # type: ignore[return-value]


def port_owner(port: int) -> str:
    """Who listens on 127.0.0.1/any address at `port`: 'pid N (command line)', or why it cannot be told."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return "a process this user cannot inspect"
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            if c.pid is None:
                return "a process of another user"
            try:
                cmd = " ".join(psutil.Process(c.pid).cmdline())[:160]
            except psutil.Error:
                cmd = "?"
            return f"pid {c.pid} ({cmd})"
    return "an unknown process (the port is in use but no listener is visible)"


def _check_ports(name: str) -> None:
    """Stop with a clear message if a port `name` needs is taken, instead of a component dying in its log."""
    want = ports()
    for key in DEFAULT_PORTS[name]:
        port = want.get(key)
        if port is None:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to bind
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                hint = (
                    ""
                    if want.get("mode") == "ephemeral"
                    else "; stop that stack (make down) or use RCM_STACK_PORTS=ephemeral"
                )
                raise SystemExit(
                    f"stack: {name} cannot start: port {port} ({key}) on 127.0.0.1 is taken by {port_owner(port)}{hint}"
                ) from None


def _env() -> dict[str, str]:
    """Credentials generated once per data directory, plus the URLs every component uses."""
    path = DATA / "stack.env"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        path.write_text(f"S3_ACCESS_KEY=rcm{secrets.token_hex(8)}\nS3_SECRET_KEY={secrets.token_urlsafe(24)}\n")
        path.chmod(0o600)
    env = dict(line.split("=", 1) for line in path.read_text().split())
    p = ports()
    return {
        **env,
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{p['s3']}",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{p['mlflow']}",
        "RAY_DASHBOARD_URL": f"http://127.0.0.1:{p['ray_dashboard']}",
        "DATABASE_URL": os.environ.get("DATABASE_URL", f"sqlite:///{DATA}/rcm.db"),
        "API_URL": f"http://127.0.0.1:{p['api']}",
    }


def _weed_port_flags(p: dict[str, int | None]) -> list[str]:
    """`-s3.port=N -s3.port.grpc=M ...` for every SeaweedFS port."""
    flags = []
    for key in DEFAULT_PORTS["seaweedfs"]:
        service, _, grpc = key.partition("_")
        flags.append(f"-{service}.port{'.grpc' if grpc else ''}={p[key]}")
    return flags


def _ray_port_flags(p: dict[str, int | None]) -> list[str]:
    """`ray start` flags for every port Ray listens on that this stack fixes (the rest Ray picks itself)."""
    names = {
        "ray_dashboard": "--dashboard-port",
        "ray_gcs": "--port",
        "ray_client": "--ray-client-server-port",
        "ray_agent": "--dashboard-agent-listen-port",
        "ray_agent_grpc": "--dashboard-agent-grpc-port",
        "ray_runtime_env": "--runtime-env-agent-port",
        "ray_metrics": "--metrics-export-port",
        "ray_object_manager": "--object-manager-port",
        "ray_node_manager": "--node-manager-port",
    }
    flags = [f"{flag}={p[key]}" for key, flag in names.items() if p.get(key) is not None]
    if p.get("mode") == "ephemeral":  # workers bind ports the OS picks, not the shared 10002-19999 range
        flags += ["--min-worker-port=0", "--max-worker-port=0"]
    return flags


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
            log = DATA / "logs" / f"{name}.log"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
            raise SystemExit(f"stack: {name} exited during start-up; see {log}; its last lines:\n{tail}")
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
    env, p = _env(), ports()
    (DATA / "endpoints.json").write_text(
        json.dumps({k: env[k] for k in ("S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "RAY_DASHBOARD_URL", "API_URL")})
    )
    base = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}  # Ray jobs resolve python from here
    if not _alive("seaweedfs"):
        _check_ports("seaweedfs")
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
                *_weed_port_flags(p),
            ],
            base,
        )
    _wait("seaweedfs", lambda: _s3_ok(env), 60)
    print(f"stack: S3 (SeaweedFS) on {env['S3_ENDPOINT_URL']}", flush=True)

    if not _alive("mlflow"):
        _check_ports("mlflow")
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
                str(p["mlflow"]),
                "--workers",
                "1",
            ],
            menv,
        )
    _wait("mlflow", lambda: _http_ok(env["MLFLOW_TRACKING_URI"] + "/health"), 120)
    print(f"stack: MLflow on {env['MLFLOW_TRACKING_URI']}", flush=True)

    if not _alive("ray"):
        _check_ports("ray")
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
                *_ray_port_flags(p),
            ],
            renv,
        )
    _wait("ray", lambda: _http_ok(env["RAY_DASHBOARD_URL"] + "/api/version"), 120)
    print(f"stack: Ray head, Jobs API on {env['RAY_DASHBOARD_URL']}", flush=True)

    if not _alive("api"):
        _check_ports("api")
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
        _spawn("api", [str(BIN / "uvicorn"), "service.main:app", "--host", "127.0.0.1", "--port", str(p["api"])], aenv)
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
