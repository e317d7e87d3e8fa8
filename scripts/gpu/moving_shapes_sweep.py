"""Guidance sweep of a saved moving-shapes teacher: samples the evaluation prompts at each CFG scale with its
default sampler's steps, scores them (the benchmark judge when present, else the quick check), records the rows and
the chosen default guidance in the teacher's moving_shapes.json, and writes a PNG + GIF strip of 8 prompts.

    python scripts/gpu/moving_shapes_sweep.py --teacher DIR --scales 2,3,4.5 [--strip OUT/teacher_samples.png]
"""

import argparse
import sys
from pathlib import Path

from rcm_core.moving_shapes_teacher import sweep_guidance


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="a moving-shapes teacher folder (rewritten: moving_shapes.json)")
    p.add_argument("--scales", required=True, help="comma-separated CFG scales, e.g. 2,3,4.5")
    p.add_argument("--steps", type=int, help="Euler steps (default: the teacher's default sampler's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--max-prompts", type=int, default=0, help="an evenly spaced subset of the evaluation prompts")
    p.add_argument("--strip", type=Path, help="PNG path of the sample strip (a GIF and a caption list beside it)")
    args = p.parse_args()
    record = sweep_guidance(
        args.teacher,
        [float(w) for w in args.scales.split(",")],
        steps=args.steps,
        seed=args.seed,
        samples_per_prompt=args.samples_per_prompt,
        max_prompts=args.max_prompts,
        strip=args.strip,
        log=lambda line: print(line, flush=True),
    )
    keys = [k for k in record["rows"][0] if k not in ("guidance_scale", "steps", "judge", "seconds")]
    print(f"\n| CFG | steps | {' | '.join(keys)} | s |")
    print("|---:|---:|" + "---:|" * (len(keys) + 1))
    for r in record["rows"]:
        print(
            f"| {r['guidance_scale']} | {r['steps']} | "
            + " | ".join(f"{r[k]:.3f}" for k in keys)
            + f" | {r['seconds']} |"
        )
    print(f"judge: {record['rows'][0]['judge']}; default guidance -> {record['chosen_guidance_scale']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
