"""Latent + text-embedding dataset shards (format "rcm-latents-v1"): Parquet files and a manifest written last.

Layout under a root (a local directory or an S3 prefix, through any `pyarrow.fs.FileSystem`):

    <root>/shard-00000.parquet, shard-00001.parquet, ...   (rows: one sample each)
    <root>/manifest.json                                   (written after every shard: its presence = complete)

Row columns: `key` (string, unique), `caption` (string), `text_len` (int32: real tokens; the rest is padding),
`tokens` (binary: the (L, D) text-embedding tokens, row-major, little-endian, in `text.dtype`, padded rows
zero), and `latent` (binary: the clean latent (C, F, H, W) in `latent.dtype`; absent in a prompts-only
dataset). Shapes and dtypes are fixed per dataset and live in the manifest, so a row is a few raw buffers and a
reader needs no per-row metadata. Parquet (Apache Arrow's reader, already a dependency) gives streaming reads from
S3 by row group, column projection (a prompts-only reader skips latents) and a documented, tool-readable format.

Manifest (JSON): {"format": "rcm-latents-v1", "count": N, "shards": [{"name", "count"}...], "text": {"tokens": L,
"dim": D, "dtype"}, "latent": {"shape": [C, F, H, W], "dtype"} | null, "encoder": {...}, "vae": {...} | null,
"extra": {...}} -- encoder/vae record the identity of what made the embeddings (class, source, config hash).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

FORMAT = "rcm-latents-v1"
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("text_len", pa.int32()),
        ("tokens", pa.binary()),
        ("latent", pa.binary()),
    ]
)


class ShardFormatError(ValueError):
    """A dataset that is not rcm-latents-v1, or a sample that does not match its manifest."""


@dataclass
class Manifest:
    count: int
    shards: list[dict[str, Any]]
    text: dict[str, Any]  # {"tokens": L, "dim": D, "dtype": "bfloat16" | "float32" | "float16"}
    latent: dict[str, Any] | None  # {"shape": [C, F, H, W], "dtype": ...}; None = prompts only
    encoder: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ShardFormatError(f"{MANIFEST} is not valid JSON") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ShardFormatError(f"{MANIFEST}: format must be {FORMAT!r}")
        try:
            return cls(
                **{k: raw[k] for k in ("count", "shards", "text", "latent")},
                **{k: raw[k] for k in ("encoder", "vae", "extra") if k in raw},
            )
        except (KeyError, TypeError) as exc:
            raise ShardFormatError(f"{MANIFEST}: missing or bad field ({exc})") from None


def _bytes(x: torch.Tensor, dtype: str) -> bytes:
    t = x.detach().to("cpu", DTYPES[dtype]).contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()


def decode(buf: bytes, shape: list[int] | tuple[int, ...], dtype: str) -> torch.Tensor:
    """Raw little-endian bytes of one tensor -> a float32 torch tensor of `shape`."""
    raw = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8).copy())
    t = raw.view(DTYPES[dtype])
    if t.numel() != int(np.prod(shape)):
        raise ShardFormatError(f"a stored tensor has {t.numel()} values, the manifest says shape {list(shape)}")
    return t.reshape(*shape).float()


class ShardWriter:
    """Write samples into Parquet shards of `samples_per_shard` rows under `root`; `close()` writes the manifest.

    Usage: with ShardWriter(fs, root, text_tokens=L, text_dim=D, latent_shape=(C, F, H, W) or None) as w:
    w.add(key, caption, tokens (L, D), text_len, latent (C, F, H, W) or None).
    """

    def __init__(
        self,
        fs: pafs.FileSystem,
        root: str,
        *,
        text_tokens: int,
        text_dim: int,
        latent_shape: tuple[int, ...] | None,
        samples_per_shard: int = 256,
        row_group_size: int = 64,
        text_dtype: str = "bfloat16",
        latent_dtype: str = "float32",
        encoder: dict | None = None,
        vae: dict | None = None,
        extra: dict | None = None,
    ):
        if min(samples_per_shard, row_group_size) < 1:
            raise ValueError("samples_per_shard and row_group_size must be >= 1")
        # a row group is the unit a streaming reader fetches and the data-parallel ranks split: large samples
        # (a Wan2.1 480p latent + its tokens are ~12 MB) want small groups (rcm_core.data.latent_stream)
        self.row_group_size = row_group_size
        self.fs, self.root = fs, root.rstrip("/")
        self.samples_per_shard = samples_per_shard
        self.manifest = Manifest(
            count=0,
            shards=[],
            text={"tokens": text_tokens, "dim": text_dim, "dtype": text_dtype},
            latent=None if latent_shape is None else {"shape": list(latent_shape), "dtype": latent_dtype},
            encoder=encoder or {},
            vae=vae,
            extra=extra or {},
        )
        self._rows: list[dict] = []
        self._keys: set[str] = set()
        fs.create_dir(self.root, recursive=True)

    def add(self, key: str, caption: str, tokens: torch.Tensor, text_len: int, latent: torch.Tensor | None) -> None:
        m = self.manifest
        if key in self._keys:
            raise ShardFormatError(f"duplicate sample key {key!r}")
        if tuple(tokens.shape) != (m.text["tokens"], m.text["dim"]):
            raise ShardFormatError(
                f"tokens of {key!r} have shape {tuple(tokens.shape)}, expected {(m.text['tokens'], m.text['dim'])}"
            )
        if (latent is None) != (m.latent is None):
            raise ShardFormatError(f"sample {key!r}: latent given for a prompts-only dataset, or missing")
        if latent is not None and list(latent.shape) != m.latent["shape"]:
            raise ShardFormatError(f"latent of {key!r} has shape {list(latent.shape)}, expected {m.latent['shape']}")
        self._keys.add(key)
        self._rows.append(
            {
                "key": key,
                "caption": caption,
                "text_len": int(text_len),
                "tokens": _bytes(tokens, m.text["dtype"]),
                "latent": None if latent is None else _bytes(latent, m.latent["dtype"]),
            }
        )
        if len(self._rows) >= self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        name = f"shard-{len(self.manifest.shards):05d}.parquet"
        table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
        with self.fs.open_output_stream(f"{self.root}/{name}") as out:
            pq.write_table(table, out, row_group_size=min(len(self._rows), self.row_group_size))
        self.manifest.shards.append({"name": name, "count": len(self._rows)})
        self.manifest.count += len(self._rows)
        self._rows = []

    def close(self) -> Manifest:
        self._flush()
        with self.fs.open_output_stream(f"{self.root}/{MANIFEST}") as out:  # last: its presence = complete
            out.write(self.manifest.to_json().encode())
        return self.manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def read_manifest(fs: pafs.FileSystem, root: str) -> Manifest:
    path = f"{root.rstrip('/')}/{MANIFEST}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ShardFormatError(f"no {MANIFEST} under the dataset root (an unfinished or foreign dataset)")
    with fs.open_input_stream(path) as f:
        return Manifest.from_json(f.read(1 << 20).decode("utf-8", errors="replace"))


def iter_shard(fs: pafs.FileSystem, root: str, manifest: Manifest, name: str, *, latents: bool = True):
    """Decoded samples of one shard, in order: dicts with key, caption, tokens (L, D) float32, mask (L,) bool,
    and latent (C, F, H, W) float32 (when the dataset has latents and `latents` is set)."""
    columns = ["key", "caption", "text_len", "tokens"] + (["latent"] if latents and manifest.latent else [])
    with fs.open_input_file(f"{root.rstrip('/')}/{name}") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(columns=columns, batch_size=64):
            for row in batch.to_pylist():
                yield _decode_row(row, manifest)


def _decode_row(row: dict, manifest: Manifest) -> dict:
    text = manifest.text
    tokens = decode(row["tokens"], (text["tokens"], text["dim"]), text["dtype"])
    out = {
        "key": row["key"],
        "caption": row["caption"],
        "tokens": tokens,
        "mask": torch.arange(text["tokens"]) < int(row["text_len"]),
    }
    if row.get("latent") is not None:
        out["latent"] = decode(row["latent"], manifest.latent["shape"], manifest.latent["dtype"])
    return out


__all__ = ["FORMAT", "MANIFEST", "Manifest", "ShardFormatError", "ShardWriter", "decode", "iter_shard", "read_manifest"]
