"""The `rcm` command: job commands against the REST API here; everything else is rcm_core's CLI.

rcm submit job.yaml|job.json    rcm jobs [--state S]    rcm status ID    rcm logs [-f] ID    rcm cancel ID
rcm upload FILE|DIR [--name NAME] [-r]   (a teacher or prompt file, or a diffusers transformer folder, stored under
                                    this tenant's input prefix; prints the URI for the job spec)
rcm preview ID (--prompt CAPTION ... | --prompt-embeds URI) --out grid.png   (a grid from the job's latest
                                    checkpoint, sampled on the cluster; waits for it and downloads it)
rcm dataset create REQUEST.yaml | rcm dataset status NAME   (`rcm data prepare` on the cluster)

The client imports nothing of rcm_core (it installs without torch): other commands run `python -m rcm_core.cli`
in this process's place (exec), so their output and exit status are rcm_core's own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

JOB_COMMANDS = {"submit", "jobs", "status", "logs", "cancel", "upload", "preview", "dataset"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rcm", description="Job commands of the rcm-distill API (RCM_API_URL, RCM_API_TOKEN).")
    p.add_argument("--url", help="API base URL (default $RCM_API_URL or http://127.0.0.1:8000)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("submit", help="submit a job spec (YAML or JSON)")
    s.add_argument("spec")
    s.add_argument("--idempotency-key")
    u = sub.add_parser(
        "upload", help="upload a teacher or prompt file, or a diffusers transformer folder; prints the URI for a job"
    )
    u.add_argument("file", help="a file, or a folder (its files, e.g. a diffusers transformer/ folder)")
    u.add_argument("--name", help="name under this tenant's input prefix (default: the file's or folder's name)")
    u.add_argument("-r", "--recursive", action="store_true", help="a folder's sub-folders too (a diffusers pipeline)")
    j = sub.add_parser("jobs", help="list jobs")
    j.add_argument("--state")
    for name in ("status", "cancel"):
        sub.add_parser(name).add_argument("job_id")
    lg = sub.add_parser("logs", help="the job's events; -f follows them live")
    lg.add_argument("job_id")
    lg.add_argument("-f", "--follow", action="store_true")
    pv = sub.add_parser("preview", help="a preview grid from a job's latest checkpoint, sampled on the cluster")
    pv.add_argument("job_id")
    pv.add_argument("--prompt", action="append", metavar="CAPTION", help="shapes jobs, repeatable: a caption")
    pv.add_argument(
        "--prompt-embeds", metavar="URI", help="diffusers jobs: an uploaded .safetensors of encoded prompts"
    )
    pv.add_argument("--steps", type=int, default=4)
    pv.add_argument("--num-samples", type=int, default=4, help="shapes: images per prompt")
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--out", required=True, help="where to write the grid (PNG); the samples go beside it")
    ds = sub.add_parser("dataset", help="`rcm data prepare` on the cluster: create REQUEST.yaml | status NAME")
    ds.add_argument("action", choices=["create", "status"])
    ds.add_argument("arg", help="create: a YAML/JSON request file; status: the dataset's name")
    return p


def _preview(client, args) -> int:
    if (args.prompt is None) == (args.prompt_embeds is None):
        print("rcm: error: give --prompt (shapes jobs) or --prompt-embeds (diffusers jobs)", file=sys.stderr)
        return 2
    queued = client.samples(
        args.job_id,
        prompts=args.prompt,
        prompt_embeds_uri=args.prompt_embeds,
        steps=args.steps,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    print(f"{queued['id']}  {queued['state']}", flush=True)
    done = client.wait_sample(args.job_id, queued["id"])
    if done["state"] != "SUCCEEDED":
        print(f"rcm: error: sampling failed: {done['failure_reason']}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(client.sample_file(args.job_id, queued["id"], "grid.png"))
    samples = out.with_suffix(".safetensors")
    samples.write_bytes(client.sample_file(args.job_id, queued["id"], "samples.safetensors"))
    print(f"step {done['step']}: {out}, {samples}")
    return 0


def _fmt_event(e: dict) -> str:
    data = e["data"]
    if e["kind"] == "progress":
        extra = " ".join(f"{k}={v:.4f}" for k, v in data.items() if k not in ("step", "recovery_count"))
        return f"{e['created_at']}  step {int(data['step'])}  {extra}"
    if e["kind"] == "effective_config":  # every setting of the job: `rcm status ID` shows them
        return f"{e['created_at']}  effective_config  (rcm status shows it)"
    return f"{e['created_at']}  {e['kind']}  " + " ".join(f"{k}={v}" for k, v in data.items())


def run_job_command(argv: list[str]) -> int:
    import yaml

    from rcm_client.client import ApiError, RcmClient

    args = _parser().parse_args(argv)
    client = RcmClient(args.url)
    try:
        if args.command == "submit":
            path = Path(args.spec)
            if not path.is_file():
                print(f"rcm: error: {path}: no such file", file=sys.stderr)
                return 2
            job = client.submit(yaml.safe_load(path.read_text()), idempotency_key=args.idempotency_key)
            print(f"{job['id']}  {job['state']}")
        elif args.command == "upload":
            path = Path(args.file)
            if path.is_dir():
                if not any(p.is_file() for p in path.iterdir()):
                    print(f"rcm: error: {path}: no files in this folder", file=sys.stderr)
                    return 2
                print(client.upload_folder(path, args.name, recursive=args.recursive)["uri"])
                return 0
            if not path.is_file():
                print(f"rcm: error: {path}: no such file", file=sys.stderr)
                return 2
            print(client.upload(path, args.name)["uri"])
        elif args.command == "preview":
            return _preview(client, args)
        elif args.command == "dataset":
            if args.action == "status":
                print(json.dumps(client.dataset(args.arg), indent=2))
                return 0
            path = Path(args.arg)
            if not path.is_file():
                print(f"rcm: error: {path}: no such file", file=sys.stderr)
                return 2
            ds = client.create_dataset(yaml.safe_load(path.read_text()))
            print(f"{ds['name']}  {ds['state']}  {ds['uri']}")
        elif args.command == "jobs":
            for job in client.jobs(state=args.state):
                print(f"{job['id']}  {job['state']:10s}  {job['step']:>7}/{job['total_steps']:<7}  {job['name']}")
        elif args.command == "status":
            print(json.dumps(client.job(args.job_id), indent=2))
        elif args.command == "cancel":
            print(f"{args.job_id}  {client.cancel(args.job_id)['state']}")
        else:
            events = client.follow(args.job_id) if args.follow else iter(client.events(args.job_id))
            for e in events:
                print(_fmt_event(e), flush=True)
    except ApiError as exc:
        print(f"rcm: error: {exc}", file=sys.stderr)
        return 2 if exc.status in (400, 404, 409, 413, 422) else 1
    except Exception as exc:  # noqa: BLE001  (connection errors: one line, no traceback)
        print(f"rcm: error: cannot reach the API at {client.url} ({type(exc).__name__})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    if first in JOB_COMMANDS:
        return run_job_command(argv)
    cmd = [sys.executable, "-m", "rcm_core.cli", *argv]
    try:
        os.execv(sys.executable, cmd)  # replaces this process: never returns
    except OSError as exc:
        print(f"rcm: error: cannot run rcm_core's CLI ({exc})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
