"""scripts/stack.py port handling without starting the stack: free ports per data directory, a clear error
naming the port and its owner when a port is taken (before any component starts)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _up(data: Path, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RCM_DATA_DIR": str(data), "RCM_STACK_PORTS": mode}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "scripts/stack.py", "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def _ports(data: Path) -> dict:
    cmd = [sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts'); import stack; stack.ports()"]
    env = {**os.environ, "RCM_DATA_DIR": str(data), "RCM_STACK_PORTS": "ephemeral"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=30)
    return json.loads((data / "ports.json").read_text())


def test_ephemeral_ports_are_distinct_per_data_dir_and_kept(tmp_path):
    a, b = _ports(tmp_path / "a"), _ports(tmp_path / "b")
    numbers = [v for v in a.values() if isinstance(v, int)]
    assert len(set(numbers)) == len(numbers) == 21  # every listening socket of every component, no repeats
    assert not {8333, 5000, 8265, 8000, 6379} & set(numbers)
    assert a != b
    assert _ports(tmp_path / "a") == a  # a restart of the same stack keeps its ports


def test_stack_up_names_the_taken_port_and_its_owner(tmp_path):
    ports = _ports(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        ports["s3"] = taken  # as if another process had taken the stack's S3 port since its first start
        (tmp_path / "ports.json").write_text(json.dumps(ports))
        start = time.monotonic()
        r = _up(tmp_path, "ephemeral")
    assert r.returncode != 0
    assert time.monotonic() - start < 30  # at once, not after a health-check timeout
    msg = r.stderr.strip().splitlines()[-1]
    assert f"port {taken} (s3)" in msg and f"pid {os.getpid()}" in msg, r.stderr
    assert not (tmp_path / "pids" / "seaweedfs.pid").exists()  # nothing was started
