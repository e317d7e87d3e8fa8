"""Checkpoints: torch.distributed.checkpoint (DCP) of a `Stateful` app state into `step-<N>/` directories.

A checkpoint directory holds the DCP shards, then `manifest.json`, written last: a directory without a
manifest is an interrupted save and is never taken as the latest. Works in one process (DCP's
no-process-group mode) and with one shard per rank under torch.distributed (every rank calls it with the same
shared directory; rank 0 alone clears it and writes the manifest, after every rank's shards are written).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

MANIFEST = "manifest.json"


def save_checkpoint(app: Stateful, root: Path, step: int, *, extra: dict[str, Any] | None = None) -> Path:
    """Save `app` to root/step-<step>/; returns the directory."""
    out = root / f"step-{step}"
    if _rank() == 0:
        if out.exists():
            shutil.rmtree(out)  # a stale or partial save of the same step
        out.mkdir(parents=True)
    _barrier()  # no rank writes into the directory before it is cleared
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save({"app": app}, checkpoint_id=str(out))
    if _rank() == 0:  # dcp.save returns on rank 0 after every rank's shards and the metadata are written
        manifest = {"step": step, "format": "dcp", **(extra or {})}
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(out / MANIFEST)
    _barrier()  # no rank looks for the manifest before it exists
    return out


def load_checkpoint(app: Stateful, path: Path) -> dict[str, Any]:
    """Load `app` in place from a checkpoint directory; returns its manifest."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MANIFEST})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load({"app": app}, checkpoint_id=str(path))
    return json.loads(manifest_path.read_text())


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under root, or None."""
    best: tuple[int, Path] | None = None
    for d in root.glob("step-*"):
        if (d / MANIFEST).is_file() and d.name[5:].isdigit():
            step = int(d.name[5:])
            best = max(best, (step, d)) if best else (step, d)
    return best[1] if best else None


class DirectoryStore:
    """Checkpoints as step-<N>/ directories under `root` (the Trainer's CheckpointStore for local runs).

    Args:
        resume_from: a checkpoint directory to restore instead of the latest under root; None = the latest.
        resume: False: restore nothing (start over, existing checkpoints are overwritten step by step).
    """

    def __init__(self, root: Path, *, resume: bool = True, resume_from: Path | None = None):
        self.root, self.resume, self.resume_from = root, resume, resume_from
        self.restored: Path | None = None

    def restore(self, app: Stateful) -> dict[str, Any] | None:
        path = self.resume_from or (latest_checkpoint(self.root) if self.resume else None)
        if path is None:
            return None
        self.restored = path
        return load_checkpoint(app, path)

    def save(self, app: Stateful, extra: dict[str, Any], metrics: dict[str, float]) -> None:
        self.last_saved = save_checkpoint(app, self.root, int(metrics["step"]), extra=extra)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
