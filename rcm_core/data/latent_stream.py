"""Streaming reader of rcm-latents-v1 datasets (rcm_core.data.latent_shards) for several data-parallel ranks.

What it guarantees:
- disjoint subsets: every epoch the dataset's Parquet row groups are put in one seeded order (the same on every
  rank) and dealt round-robin to the data-parallel ranks; rank r reads only its own groups. Context-parallel
  ranks of one data-parallel group pass the same `dp_rank` and so read the same samples;
- a shuffle buffer of `buffer_size` samples over the rank's stream of rows (rows enter in group order, a seeded
  uniform pick leaves), on top of the shuffled group order;
- a resumable position `(epoch, emitted)`: the emission order of an epoch is a pure function of (seed, epoch,
  dp_rank, dp_size, the row-group layout), computed up front in index space (no data read). A reader rebuilt and
  `seek`-ed to a recorded position yields exactly the rest of that epoch: no sample of the epoch twice, none lost.
  Only the row groups the remaining order needs are read.
- prefetch: row groups are read and decoded on `prefetch` background threads (pyarrow releases the GIL in S3 I/O
  and Parquet decoding), in the order the emission first needs them; a group's rows stay in memory until each has
  been emitted, so memory is about `buffer_size` + one row group of samples (plus the prefetched groups).

Samples are dicts: key, caption, tokens (L, D) and latent (C, F, H, W) in the dataset's stored dtypes (convert
on the device), mask (L,) bool. The position is the caller's to store (e.g. in a checkpoint).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from rcm_core.data.latent_shards import DTYPES, Manifest, ShardFormatError, read_manifest


@dataclass
class DataAccess:
    """Where and as which data-parallel rank a process reads a dataset (the entry point knows both: the Ray worker
    passes its S3 filesystem and its rank in the data-parallel group; the local CLI the defaults)."""

    fs: pafs.FileSystem | None = None  # None: the local filesystem, with data.uri a directory
    root: str | None = None  # the dataset's path under fs; None: data.uri
    dp_rank: int = 0
    dp_size: int = 1
    # every data-parallel rank's rows concatenated in rank order (a collective); None with one rank
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class RowGroup:
    shard: str  # file name under the dataset root
    index: int  # row group index inside the shard
    rows: int


def list_row_groups(fs: pafs.FileSystem, root: str, manifest: Manifest) -> list[RowGroup]:
    """Every row group of the dataset, in manifest order (reads each shard's Parquet footer only).

    Raises:
        ShardFormatError: a shard's rows disagree with the manifest's count.
    """
    groups = []
    for shard in manifest.shards:
        with fs.open_input_file(f"{root.rstrip('/')}/{shard['name']}") as f:
            meta = pq.ParquetFile(f).metadata
        rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if sum(rows) != shard["count"]:
            raise ShardFormatError(f"{shard['name']} holds {sum(rows)} rows, the manifest says {shard['count']}")
        groups += [RowGroup(shard["name"], i, n) for i, n in enumerate(rows)]
    return groups


def epoch_order(
    groups: list[RowGroup], *, seed: int, epoch: int, dp_rank: int, dp_size: int, buffer_size: int
) -> list[tuple[int, int]]:
    """The (group index, row) pairs rank `dp_rank` emits in `epoch`, in emission order.

    Groups: a permutation seeded by (seed, epoch), shared by all ranks, dealt round-robin. Rows: the rank's rows
    in group order pass through a shuffle buffer of `buffer_size` (seeded by (seed, epoch, dp_rank)).
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
    perm = np.random.default_rng([seed, epoch]).permutation(len(groups))
    mine = perm[dp_rank::dp_size]
    rng = np.random.default_rng([seed, epoch, dp_rank, 1])
    buffer: list[tuple[int, int]] = []
    out: list[tuple[int, int]] = []

    def pop() -> None:
        j = int(rng.integers(len(buffer)))
        out.append(buffer[j])
        buffer[j] = buffer[-1]
        buffer.pop()

    for g in mine:
        for row in range(groups[g].rows):
            buffer.append((int(g), row))
            if len(buffer) >= max(buffer_size, 1):
                pop()
    while buffer:
        pop()
    return out


class LatentStream:
    """Endless iterator over this rank's samples, epoch after epoch (see the module docstring).

    Args:
        fs, root: the dataset (a pyarrow filesystem and the path under it: "bucket/prefix" for S3).
        dp_rank, dp_size: this rank's data-parallel index and the number of data-parallel ranks.
        seed: shuffling seed (the job's).
        buffer_size: shuffle buffer, in samples (1: no row shuffle, groups still shuffled).
        latents: read the latent column (False: prompts only, or a DMD-only job that needs no data latents).
        prefetch: row groups read ahead on background threads.
    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        root: str,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        buffer_size: int = 256,
        latents: bool = True,
        prefetch: int = 2,
        manifest: Manifest | None = None,
    ):
        self.fs, self.root = fs, root.rstrip("/")
        self.manifest = manifest or read_manifest(fs, self.root)
        self.groups = list_row_groups(fs, self.root, self.manifest)
        if len(self.groups) < dp_size:
            raise ShardFormatError(
                f"the dataset has {len(self.groups)} row groups, fewer than the {dp_size} data-parallel ranks "
                "that each read a disjoint share (write it with smaller row groups or more samples)"
            )
        self.dp_rank, self.dp_size, self.seed, self.buffer_size = dp_rank, dp_size, seed, buffer_size
        self.latents = latents and self.manifest.latent is not None
        self._pool = ThreadPoolExecutor(max(prefetch, 1), thread_name_prefix="latent-stream")
        self._prefetch = max(prefetch, 1)
        self.seek(0, 0)

    # -- position ----------------------------------------------------------------------------------
    @property
    def position(self) -> tuple[int, int]:
        """(epoch, samples emitted in it): record it with a checkpoint, `seek` to it on resume."""
        return self.epoch, self.emitted

    def seek(self, epoch: int, emitted: int) -> None:
        """Continue as if `emitted` samples of `epoch` had been taken (drops whatever was read ahead)."""
        self.epoch, self.emitted = int(epoch), int(emitted)
        self.order = epoch_order(
            self.groups,
            seed=self.seed,
            epoch=self.epoch,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            buffer_size=self.buffer_size,
        )
        if not 0 <= self.emitted <= len(self.order):
            raise ValueError(f"position {emitted} is outside epoch {epoch}'s {len(self.order)} samples")
        # the groups the rest of the epoch needs, in the order it first needs them, and how many rows of each
        self._pending: dict[int, int] = {}
        # after a resume some rows of a group were emitted before: read only the others (None: every row)
        self._needed: dict[int, set[int]] | None = {} if self.emitted else None
        for g, row in self.order[self.emitted :]:
            self._pending[g] = self._pending.get(g, 0) + 1
            if self._needed is not None:
                self._needed.setdefault(g, set()).add(row)
        self._queue: deque[int] = deque(self._pending)  # dicts keep first-insertion order
        self._loading: dict[int, Future] = {}
        self._rows: dict[int, dict[int, dict]] = {}
        self._fill()

    def epoch_size(self) -> int:
        return len(self.order)

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> LatentStream:
        return self

    def __next__(self) -> dict:
        if self.emitted == len(self.order):
            self.seek(self.epoch + 1, 0)
        g, row = self.order[self.emitted]
        if g not in self._rows:
            self._rows[g] = self._loading.pop(g).result()
            self._fill()
        sample = self._rows[g].pop(row)
        self._pending[g] -= 1
        if not self._pending[g]:
            del self._rows[g], self._pending[g]
        self.emitted += 1
        return sample

    def take(self, n: int) -> list[dict]:
        return [next(self) for _ in range(n)]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- reading -----------------------------------------------------------------------------------
    def _fill(self) -> None:
        while self._queue and len(self._loading) < self._prefetch:
            g = self._queue.popleft()
            rows = None if self._needed is None else self._needed.pop(g)
            self._loading[g] = self._pool.submit(self._read_group, self.groups[g], rows)

    def _read_group(self, group: RowGroup, rows: set[int] | None) -> dict[int, dict]:
        """Decoded rows of one row group (only `rows`, when given: the rest were emitted before a resume)."""
        columns = ["key", "caption", "text_len", "tokens"] + (["latent"] if self.latents else [])
        with self.fs.open_input_file(f"{self.root}/{group.shard}") as f:
            table = pq.ParquetFile(f).read_row_group(group.index, columns=columns)
        if table.num_rows != group.rows:
            raise ShardFormatError(f"{group.shard} row group {group.index} changed under the reader")
        text, lat = self.manifest.text, self.manifest.latent
        keys, captions = table.column("key").to_pylist(), table.column("caption").to_pylist()
        lengths = table.column("text_len").to_pylist()
        tokens_col = table.column("tokens").combine_chunks()
        latent_col = table.column("latent").combine_chunks() if self.latents else None
        out = {}
        for i in range(table.num_rows) if rows is None else sorted(rows):
            sample = {
                "key": keys[i],
                "caption": captions[i],
                "tokens": _view(tokens_col[i].as_buffer(), (text["tokens"], text["dim"]), text["dtype"]),
                "mask": torch.arange(text["tokens"]) < int(lengths[i]),
            }
            if latent_col is not None:
                if not latent_col[i].is_valid:
                    raise ShardFormatError(f"sample {keys[i]!r} has no latent, the manifest says it has one")
                sample["latent"] = _view(latent_col[i].as_buffer(), lat["shape"], lat["dtype"])
            out[i] = sample
        return out


def _view(buf, shape, dtype: str) -> torch.Tensor:
    """A tensor over a copy of one stored value (stored dtype: convert where it is used, e.g. on the GPU)."""
    raw = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy())
    t = raw.view(DTYPES[dtype])
    if t.numel() != int(np.prod(shape)):
        raise ShardFormatError(f"a stored tensor has {t.numel()} values, the manifest says shape {list(shape)}")
    return t.reshape(*shape)


def collate(samples: list[dict]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """(x0 (B, C, F, H, W) or None, cond {"tokens": (B, L, D), "mask": (B, L)}); padding tokens zeroed."""
    mask = torch.stack([s["mask"] for s in samples])
    tokens = torch.stack([s["tokens"] for s in samples])
    tokens = tokens * mask[..., None].to(tokens.dtype)  # both pipelines zero the padding's embeddings
    x0 = torch.stack([s["latent"] for s in samples]) if "latent" in samples[0] else None
    return x0, {"tokens": tokens, "mask": mask}


__all__ = ["DataAccess", "LatentStream", "RowGroup", "collate", "epoch_order", "list_row_groups"]
