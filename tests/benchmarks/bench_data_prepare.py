"""Shard-preparation throughput of `rcm data prepare` (a script, not collected by pytest).

Runs the real code path (rcm_core.data.prepare.prepare_dataset) on the tiny random pipelines of
tests/teachers/pipeline_tiny.py, or on a pipeline directory given with --pipeline: prompts only, images through
the VAE, and teacher synthesis. Prints one line per mode (prompts/s over text encoding, latents/s over VAE
encoding or sampling, wall samples/s) and appends a CSV row each to --csv when given. With the tiny models
the numbers are a smoke test of the pipeline's overhead, not of a real encoder: umT5-XXL and the Wan VAE need a
GPU run with their weights.

    PYTHONPATH=$PWD python tests/benchmarks/bench_data_prepare.py --prompts 256 --batch-size 32
"""

from __future__ import annotations

import argparse
import csv
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", help="a diffusers pipeline directory (default: a tiny random Wan2.1 one)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--synthesize", type=int, default=16, help="prompts sampled by the teacher")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-sequence-length", type=int, default=512)
    ap.add_argument("--size", default="32x64")
    ap.add_argument("--latent-shape", default="4,3,4,8")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--csv")
    args = ap.parse_args()

    from PIL import Image

    from rcm_core.data.prepare import PrepareConfig, prepare_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    if args.pipeline:
        pipeline = Path(args.pipeline)
    else:
        from tests.teachers.pipeline_tiny import save_wan_pipeline

        pipeline = save_wan_pipeline(work / "pipeline")
    words = "a cat dog on the mat red blue big small runs jumps under sky".split()
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(words, size=rng.integers(3, 40))) for _ in range(args.prompts)]
    (work / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (work / "few.txt").write_text("\n".join(prompts[: args.images]) + "\n")
    (work / "synth.txt").write_text("\n".join(prompts[: args.synthesize]) + "\n")
    h, w = (int(v) for v in args.size.split("x"))
    (work / "img").mkdir()
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(work / "img" / f"{i}.png")
    (work / "media.txt").write_text("\n".join(f"img/{i}.png" for i in range(args.images)) + "\n")

    common = dict(pipeline=str(pipeline), batch_size=args.batch_size, max_sequence_length=args.max_sequence_length,
                  device=args.device, dtype=args.dtype)  # fmt: skip
    modes = {
        "prompts-only": PrepareConfig(prompts=str(work / "prompts.txt"), out=str(work / "a"), **common),
        "images": PrepareConfig(
            prompts=str(work / "few.txt"), out=str(work / "b"), media=str(work / "media.txt"), size=(h, w), **common
        ),  # fmt: skip
        "synthesize": PrepareConfig(
            prompts=str(work / "synth.txt"),
            out=str(work / "c"),
            synthesize=True,
            latent_shape=tuple(int(v) for v in args.latent_shape.split(",")),
            steps=args.steps,
            **common,
        ),  # fmt: skip
    }
    hardware = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    for name, cfg in modes.items():
        start = time.perf_counter()
        s = prepare_dataset(cfg)
        wall = time.perf_counter() - start
        lat = f"{s['latents_per_s']:.2f}" if s["latents_per_s"] else "-"
        rate = s["count"] / wall
        print(
            f"{name:13s} n={s['count']:4d}  text {s['prompts_per_s']:8.2f} prompts/s  latents {lat:>8} /s  "
            f"wall {rate:7.2f} samples/s (incl. loading, {wall:.1f}s)  {args.device} {hardware}"
        )
        if args.csv:
            with open(args.csv, "a", newline="") as f:
                csv.writer(f).writerow([time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), hardware, args.device,
                                        name, s["count"], s["prompts_per_s"], s["latents_per_s"], wall,
                                        args.max_sequence_length, args.batch_size, str(pipeline)])  # fmt: skip


if __name__ == "__main__":
    main()
