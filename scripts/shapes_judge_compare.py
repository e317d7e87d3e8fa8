"""Score the same shapes samples with the first judge and the fixed one (issue 20), side by side.

    python scripts/shapes_judge_compare.py BENCH_DIR [--old-commit ada87e5] [--out DIR]
    python scripts/shapes_judge_compare.py --synthetic [--n 1000]

BENCH_DIR is an `rcm bench shapes` output (report.json + images.npz). The first judge is read from git
(rcm_core/eval/geneval.py at --old-commit, the last commit before the fix) into a private module; the diversity
metric uses whichever judge's detector is being compared. Prints both tables; with --out writes table_old.md,
table_new.md and compare.json there. --synthetic instead prints both judges' numbers on the renderer's images
under blur + noise (mild = sigma 0.7 px + sd 10, and heavier), on the noise images of
tests/unit/test_geneval_judge.py, and on touching pairs of objects.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rcm_core.benchmarks.shapes import rescore_shapes_benchmark  # noqa: E402
from rcm_core.eval import diversity, geneval  # noqa: E402
from rcm_core.eval import shapes as ev  # noqa: E402


def _old_judge(commit: str):
    source = subprocess.run(
        ["git", "show", f"{commit}:rcm_core/eval/geneval.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "geneval_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("geneval_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _with_judge(judge, bench: Path, out: Path) -> tuple[str, dict]:
    ev.score, diversity.detect, diversity._matches = judge.score, judge.detect, judge._matches
    table, files = rescore_shapes_benchmark(bench, out)
    return table, json.loads(files[0].read_text())


def _synthetic(judges: dict, n: int) -> None:
    import itertools

    import numpy as np

    from rcm_core.data.shapes import COLORS, SHAPES, SIZES, all_prompts, render, render_scene, sample_prompt

    spec = importlib.util.spec_from_file_location("judge_tests", ROOT / "tests/unit/test_geneval_judge.py")
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    key = tests._key
    print("| case | " + " | ".join(judges) + " |\n|---|" + "---:|" * len(judges))
    for sigma, sd in ((0.0, 0.0), (0.5, 5.0), (0.7, 10.0), (1.0, 15.0), (1.5, 25.0)):
        rng = np.random.default_rng(1)
        prompts, images, objects = [], [], []
        for _ in range(n):
            prompt = sample_prompt(rng, split="train" if rng.random() < 0.8 else "held_out")
            image, objs = render(prompt, rng)
            prompts.append(prompt)
            images.append(geneval.degrade(image, sigma, sd, rng))
            objects.append(sorted(map(key, objs)))
        cells = []
        for judge in judges.values():
            exact = np.mean([sorted(map(key, judge.detect(im))) == o for im, o in zip(images, objects, strict=True)])
            cells.append(f"{judge.score(prompts, images)['overall']:.3f} (exact {exact:.3f})")
        print(
            f"| renderer, blur {sigma} px + noise sd {sd:g}: score (objects read exactly) | " + " | ".join(cells) + " |"
        )
    for kind, make in tests.NOISE.items():
        rng = np.random.default_rng(11)
        images = [make(rng) for _ in all_prompts()]
        cells = [f"{judge.score(all_prompts(), images)['overall']:.3f}" for judge in judges.values()]
        print(f"| noise '{kind}', 126 prompts: score | " + " | ".join(cells) + " |")
    for same in (False, True):
        rng, pairs = np.random.default_rng(3), []
        colours = [(c, c) for c in COLORS] if same else list(itertools.permutations(COLORS, 2))
        for s0, s1, (c0, c1), (z0, z1), h in itertools.product(
            SHAPES, SHAPES, colours, itertools.product(SIZES, SIZES), (True, False)
        ):
            a, b = tests._touching_pair(s0, c0, z0, s1, c1, z1, h)
            pairs.append(([a, b], render_scene([a, b])))
            pairs.append(([a, b], geneval.degrade(render_scene([a, b]), 0.7, 10.0, rng)))
        cells = [
            f"{np.mean([sorted(map(key, j.detect(im))) == sorted(map(key, o)) for o, im in pairs]):.3f}"
            for j in judges.values()
        ]
        what = "one colour" if same else "different colours"
        print(f"| touching pairs of {what} (clean + mild), both read exactly | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, nargs="?")
    parser.add_argument("--old-commit", default="ada87e5")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--n", type=int, default=1000, help="--synthetic: renderer images per case")
    args = parser.parse_args()
    if args.synthetic:
        _synthetic({f"first judge ({args.old_commit})": _old_judge(args.old_commit), "fixed judge": geneval}, args.n)
        return 0
    if args.bench is None:
        parser.error("give BENCH_DIR or --synthetic")
    out = args.out or Path(tempfile.mkdtemp())
    old_table, old = _with_judge(_old_judge(args.old_commit), args.bench, out / "old")
    new_table, new = _with_judge(geneval, args.bench, out / "new")
    print(f"first judge ({args.old_commit}):\n{old_table}\n\nfixed judge:\n{new_table}")
    if args.out:
        (out / "table_old.md").write_text(old_table + "\n")
        (out / "table_new.md").write_text(new_table + "\n")
        (out / "compare.json").write_text(json.dumps({"old": old["rows"], "new": new["rows"]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
