"""Score the same shapes samples with the first judge and the fixed one (issue 20), side by side.

    python scripts/shapes_judge_compare.py BENCH_DIR [--old-commit ada87e5] [--out DIR]

BENCH_DIR is an `rcm bench shapes` output (report.json + images.npz). The first judge is read from git
(rcm_core/eval/geneval.py at --old-commit, the last commit before the fix) into a private module; the diversity
metric uses whichever judge's detector is being compared. Prints both tables; with --out writes table_old.md,
table_new.md and compare.json there. Also the judges' agreement on the synthetic checks of
tests/unit/test_geneval_judge.py can be had from that test file; this script is about real samples.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path)
    parser.add_argument("--old-commit", default="ada87e5")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
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
