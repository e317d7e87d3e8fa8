"""`rcm data moving-shapes`: rendered moving-shapes clips -> an rcm-latents-v1 dataset for the `diffusers` task.

Each sample is a clip drawn from the grammar's train or held-out split (rcm_core.data.moving_shapes), stored as
its "latent": the pixels themselves, (C=3, F, 32, 32) in [-1, 1] (this task has no VAE), and its caption encoded
by the frozen text encoder (rcm_core.data.moving_shapes_text) as (L, D) tokens + length. The manifest
(rcm_core.data.latent_shards, written last by ShardWriter) records the encoder's spec, the renderer's version,
the split and the seed.

Determinism: the dataset is split into chunks of CHUNK clips; chunk c is drawn by its own Generator seeded
(seed, split, c), so a dataset depends on (count, split, seed) only, not on the number of worker processes.
Rendering runs in `workers` spawned processes (numpy only, ~1 ms a clip); the parent encodes the text and
writes the shards in chunk order.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from rcm_core.config import ConfigError
from rcm_core.data import moving_shapes
from rcm_core.data.latent_shards import ShardWriter
from rcm_core.data.moving_shapes_text import DEFAULT_DIM, DEFAULT_TOKENS, FrozenTextEncoder

CHUNK = 1024
SPLITS = {"train": 0, "held_out": 1}
LATENT_DTYPE = "float16"  # k / 127.5 - 1 for uint8 k: float16's error (< 5e-4) rounds back to the same k


def render_chunk(args: tuple[int, str, int, int]) -> tuple[np.ndarray, list[str]]:
    """(clips (n, F, H, W, 3) uint8, captions) of chunk `chunk`: the worker's job (picklable, numpy only)."""
    seed, split, chunk, n = args
    rng = np.random.default_rng([seed, SPLITS[split], chunk])
    prompts = [moving_shapes.sample_prompt(rng, split=split) for _ in range(n)]
    clips = np.stack([moving_shapes.render_clip(p, rng)[0] for p in prompts])
    return clips, [p.caption() for p in prompts]


def _chunks(count: int, seed: int, split: str) -> list[tuple[int, str, int, int]]:
    return [(seed, split, c, min(CHUNK, count - c * CHUNK)) for c in range(-(-count // CHUNK))]


def write_dataset(
    out: str,
    *,
    count: int,
    split: str = "train",
    seed: int = 0,
    workers: int = 0,
    text_tokens: int = DEFAULT_TOKENS,
    text_dim: int = DEFAULT_DIM,
    text_seed: int = 0,
    samples_per_shard: int = 4096,
    progress: Callable[[str], None] = lambda line: None,
) -> dict:
    """Render `count` clips of `split` and write them under `out` (a new local directory or s3://bucket/prefix).

    Returns a summary (count, shards, seconds, clips_per_s, out, encoder sha256). Raises ConfigError for a bad
    argument or an `out` that already holds a dataset.
    """
    from rcm_core.data.prepare import open_output

    if count < 1:
        raise ConfigError(f"--count must be >= 1, got {count}")
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    try:
        encoder = FrozenTextEncoder(tokens=text_tokens, dim=text_dim, seed=text_seed)
    except ValueError as exc:
        raise ConfigError(f"text encoder: {exc}") from None
    fs, root = open_output(out)
    shape = (3, moving_shapes.FRAMES, moving_shapes.IMAGE_SIZE, moving_shapes.IMAGE_SIZE)
    writer = ShardWriter(
        fs,
        root,
        text_tokens=encoder.tokens,
        text_dim=encoder.dim,
        latent_shape=shape,
        samples_per_shard=samples_per_shard,
        row_group_size=256,
        text_dtype="float32",  # the encoder's exact values (a row's tokens are 4 KB)
        latent_dtype=LATENT_DTYPE,
        encoder=encoder.spec(),
        vae=None,
        extra={
            "task": "moving-shapes",
            "renderer": moving_shapes.RENDERER_VERSION,
            "split": split,
            "seed": seed,
            "latent": "pixels (C, F, H, W) in [-1, 1]; no VAE",
            "chunk": CHUNK,
        },
    )
    start = time.perf_counter()
    jobs = _chunks(count, seed, split)
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers)
        parts = pool.imap(render_chunk, jobs)  # in chunk order, rendered ahead of the writer
    else:
        parts = map(render_chunk, jobs)
    done = 0
    try:
        for (_, _, chunk, _), (clips, captions) in zip(jobs, parts, strict=True):
            tokens, lengths = encoder.encode(captions)
            latents = torch.from_numpy(moving_shapes.to_model_layout(clips))  # (n, 3, F, H, W) float32
            tokens_t = torch.from_numpy(tokens)
            for j, caption in enumerate(captions):
                writer.add(f"{split}-{chunk * CHUNK + j:08d}", caption, tokens_t[j], int(lengths[j]), latents[j])
            done += len(captions)
            progress(f"[moving-shapes] {done}/{count} clips  {done / (time.perf_counter() - start):.0f} clips/s")
    finally:
        if pool is not None:
            pool.terminate()
    manifest = writer.close()
    seconds = time.perf_counter() - start
    return {
        "count": manifest.count,
        "shards": len(manifest.shards),
        "out": out,
        "split": split,
        "seconds": seconds,
        "clips_per_s": manifest.count / max(seconds, 1e-9),
        "encoder_sha256": encoder.sha256(),
    }


__all__ = ["CHUNK", "LATENT_DTYPE", "render_chunk", "write_dataset"]
