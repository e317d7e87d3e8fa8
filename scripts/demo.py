"""`make demo`: the service end to end on this machine.

Starts the local stack (S3, MLflow, Ray, API), uploads the built-in 2-D teacher to S3, submits the rCM
demo job over REST, shows its progress, then prints the student vs. teacher table, the MLflow run URL
and the API docs URL. The stack keeps running (`make down` stops it).
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
    from rcm_core import pipeline
    from rcm_core.cli import print_reporter
    from rcm_core.config import toy2d_rcm
    from rcm_core.eval.toy2d import format_table

    env = stack.up()
    cfg = toy2d_rcm()
    _, _, teacher_path = pipeline.get_teacher(cfg, print_reporter)
    s3 = stack.s3_client(env)
    s3.upload_file(str(teacher_path), "ckpt", "teachers/toy2d-ring8.safetensors")
    print("demo: teacher uploaded to s3://ckpt/teachers/toy2d-ring8.safetensors")

    spec = json.loads((ROOT / "examples" / "jobs" / "rcm-ring8.json").read_text())
    spec["teacher"]["uri"] = "s3://ckpt/teachers/toy2d-ring8.safetensors"
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
        elif line.split("loss")[0] != last_line.split("loss")[0] and job["step"] % 100 == 0:
            print(line, flush=True)
        last_line = line
    print("\r" + bar(job, start) if tty else bar(job, start))
    if job["state"] != "SUCCEEDED":
        print(f"demo: job {job['state']}: {job['failure_reason']}", file=sys.stderr)
        return 1
    report = json.loads(s3.get_object(Bucket="ckpt", Key=f"jobs/{job['id']}/export/report.json")["Body"].read())
    print(format_table(report["rows"]))
    print(f"demo: MLflow run   {job['mlflow_run_url']}")
    print(f"demo: API docs     {env['API_URL']}/docs   (token: {stack.DATA / 'demo-token'})")
    print(f"demo: checkpoints  {[c['uri'] for c in client.checkpoints(job['id'])][-1]}")
    print("demo: the stack keeps running; `make down` stops it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
