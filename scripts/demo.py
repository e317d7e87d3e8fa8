"""`make demo`: the service end to end on this machine.

Starts the local stack (S3, MLflow, Ray, API), submits the rCM job of examples/jobs/rcm-shapes.json over REST
(the text-to-image teacher shipped with rcm_core, `builtin:shapes`; a short CPU schedule), shows its progress,
then prints the teacher vs. student table (1/2/4 steps), the MLflow run URL and the API docs URL. The stack
keeps running (`make down` stops it).

The schedule is a smoke run sized to keep `make demo` under 5 minutes on a 2-core CPU: 10 steps of batch 8 do
not yet make a good 1-step student (the shapes students of the README are trained on a GPU). The teacher rows
are the teacher at 4 Euler steps on this CPU and its stored 50-step evaluation on a GPU (from its file).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import stack  # noqa: E402


def bar(job: dict, start: float) -> str:
    step, total = job["step"], job["total_steps"]
    frac = step / total if total else 0.0
    elapsed = time.monotonic() - start
    eta = f"{(elapsed / frac - elapsed):5.0f}s" if 0 < frac < 1 else "   --"
    loss = job["metrics"].get("loss")
    filled = int(30 * frac)
    loss_text = f"loss {loss:.4f}" if loss is not None else "loss   --  "
    return f"[{'#' * filled}{'.' * (30 - filled)}] {step:>5}/{total} {loss_text}  eta {eta}  {job['state']}"


def main() -> int:
    from rcm_client import RcmClient
    from rcm_core.eval.shapes import format_table

    wall = time.monotonic()
    env = stack.up()
    s3 = stack.s3_client(env)
    spec = json.loads((ROOT / "examples" / "jobs" / "rcm-shapes.json").read_text())
    client = RcmClient(env["API_URL"], (stack.DATA / "demo-token").read_text().strip())
    job = client.submit(spec)
    print(f"demo: submitted job {job['id']} over REST ({env['API_URL']}/v1/jobs)")
    start, tty = time.monotonic(), sys.stdout.isatty()
    last_line = ""
    while job["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
        time.sleep(1.0)
        job = client.job(job["id"])
        line = bar(job, start)
        if tty:
            print("\r" + line, end="", flush=True)
        elif line.split("loss")[0] != last_line.split("loss")[0]:
            print(line, flush=True)
        last_line = line
    print("\r" + bar(job, start) if tty else bar(job, start))
    if job["state"] != "SUCCEEDED":
        print(f"demo: job {job['state']}: {job['failure_reason']}", file=sys.stderr)
        return 1
    report = json.loads(s3.get_object(Bucket="ckpt", Key=f"jobs/{job['id']}/export/report.json")["Body"].read())
    print(format_table(report["rows"]))
    print("demo: 'stored' = the teacher's own evaluation from its file (GPU, 50 Euler steps); - = not measured")
    print("demo: a 10-step CPU smoke run; the schedule that reaches the targets needs a GPU (~16 min on an H200):")
    print("demo:   rcm distill configs/shapes-rcm-gpu.yaml   (README, 'The shapes text-to-image benchmark')")
    print(f"demo: MLflow run   {job['mlflow_run_url']}")
    print(f"demo: API docs     {env['API_URL']}/docs   (token: {stack.DATA / 'demo-token'})")
    print(f"demo: checkpoints  {[c['uri'] for c in client.checkpoints(job['id'])][-1]}")
    print(f"demo: total {time.monotonic() - wall:.0f}s; the stack keeps running, `make down` stops it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
