"""scripts/torchrun_rcm.py under torchrun (2 gloo ranks, CP=2, tiny DiT): it trains, writes sharded checkpoints,
and a second launch resuming from step 2 reproduces step 3's loss exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.distributed.harness import free_port

ROOT = Path(__file__).parents[2]
TINY = ["--image-size", "8", "--channels", "3", "--dim", "64", "--depth", "1", "--heads", "2", "--cond-len", "4"]
TINY += ["--cond-dim", "32", "--batch-size", "2", "--cp-degree", "2", "--activation-checkpoint", "none"]


def _torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(free_port()), str(ROOT / "scripts" / "torchrun_rcm.py"), *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torchrun_entry_point_trains_checkpoints_and_resumes(tmp_path):
    results, ckpt = tmp_path / "results.jsonl", tmp_path / "ckpt"
    _torchrun("--steps", "3", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--results", str(results))
    assert (ckpt / "step-2" / "manifest.json").is_file() and (ckpt / "step-3" / "manifest.json").is_file()
    _torchrun("--steps", "1", "--resume", str(ckpt / "step-2"), "--results", str(results))
    full, resumed = (json.loads(line) for line in results.read_text().splitlines())
    assert (full["world_size"], full["cp_degree"], full["tokens_per_sample"]) == (2, 2, 16)
    assert resumed["losses"] == full["losses"][2:]
