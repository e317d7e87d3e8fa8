"""API latency benchmark (a script, not a test): p50/p99 of POST /v1/jobs and GET /v1/jobs/{id} at a fixed rate.

Starts its own API under uvicorn on 127.0.0.1:8001 with a fresh SQLite database and the reconciler idle
(RECONCILE_INTERVAL_S=3600, Ray pointed at a closed port), so submitted jobs stay QUEUED and no training
runs: it measures the control plane itself (HTTP, auth, validation, the job store). Open-loop load:
requests are sent on a fixed schedule whatever the latency, in a bounded count.

    .venv/bin/python tests/benchmarks/bench_api.py --rate 50 --seconds 10 --out docs/bench_api.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
URL = "http://127.0.0.1:8001"
SPEC = {"name": "bench", "teacher": {"uri": "builtin:toy2d"}, "schedule": {"steps": 100}}


async def run_load(client: httpx.AsyncClient, method: str, path_fn, rate: float, seconds: float) -> list[float]:
    n = int(rate * seconds)
    start = time.perf_counter()
    latencies: list[float] = []

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        t0 = time.perf_counter()
        r = await client.request(method, path_fn(i), json=SPEC if method == "POST" else None)
        latencies.append(time.perf_counter() - t0)
        assert r.status_code in (200, 202), r.text

    await asyncio.gather(*(one(i) for i in range(n)))
    return latencies


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] * 1000 if len(xs) > 1 else xs[0] * 1000


async def bench(rate: float, seconds: float, token: str) -> list[dict]:
    rows = []
    async with httpx.AsyncClient(base_url=URL, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        created = (await client.post("/v1/jobs", json=SPEC)).json()["id"]
        for method, path_fn in (("POST", lambda i: "/v1/jobs"), ("GET", lambda i: f"/v1/jobs/{created}")):
            lat = await run_load(client, method, path_fn, rate, seconds)
            rows.append(
                {
                    "endpoint": f"{method} {'/v1/jobs' if method == 'POST' else '/v1/jobs/{id}'}",
                    "rate": rate,
                    "requests": len(lat),
                    "p50_ms": pct(lat, 50),
                    "p99_ms": pct(lat, 99),
                    "max_ms": max(lat) * 1000,
                }
            )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=50.0, help="requests per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path, help="append the markdown table here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rcm-bench-api-"))
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp}/bench.db",
        "S3_ACCESS_KEY": "bench",
        "S3_SECRET_KEY": "bench",
        "RECONCILE_INTERVAL_S": "3600",
        "RAY_DASHBOARD_URL": "http://127.0.0.1:9",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
    }
    token = subprocess.run(
        [sys.executable, "-m", "service.admin", "create-token", "--tenant", "bench"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            "8001",
            "--log-level",
            "warning",
        ],
        env=env,
        cwd=ROOT,
    )
    try:
        for _ in range(100):
            try:
                if httpx.get(URL + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        rows = asyncio.run(bench(args.rate, args.seconds, token))
    finally:
        server.terminate()
        server.wait(10)
    head = "| endpoint | rate (req/s) | requests | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|"
    lines = [head] + [
        f"| {r['endpoint']} | {r['rate']:.0f} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
        f"{r['max_ms']:.1f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    meta = (
        f"{datetime.now(UTC):%Y-%m-%d}, {platform.machine()} CPU ({os.cpu_count()} cores), SQLite, one uvicorn worker, "
        f"`{' '.join(sys.argv)}`"
    )
    print(table)
    print(meta)
    if args.out:
        with args.out.open("a") as f:
            f.write(f"\n{table}\n\n{meta}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
