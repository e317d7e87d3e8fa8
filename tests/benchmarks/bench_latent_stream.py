"""Throughput of the streaming dataset reader (rcm_core.data.latent_stream) from a real SeaweedFS on loopback, at the
real Wan2.1-1.3B sample size: a 480p x 81-frame latent (16, 21, 60, 104) in float32 or bfloat16 plus its umT5 text
tokens (512, 4096) in bfloat16 (~120 real tokens, the padding zeroed as the pipeline does).

Per configuration: one reader (a worker that is the only data-parallel rank), and two readers at once in threads
(two data-parallel workers of one host, each reading its own share), each taking its whole share in batches of
one and collating them (what DatasetData does on the host before the device copy). Reports samples/s per worker
and MB/s, prints a table and writes JSON. A script, not collected by pytest:

    PYTHONPATH=$PWD .venv/bin/python tests/benchmarks/bench_latent_stream.py --samples 48 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import torch

from rcm_core.data.latent_shards import ShardWriter
from rcm_core.data.latent_stream import LatentStream, collate
from tests.service.realstack import running_s3

LATENT = (16, 21, 60, 104)  # Wan2.1 VAE latent of 81 frames at 480 x 832
TOKENS, TEXT_DIM, REAL_TOKENS = 512, 4096, 120


def write(fs, root: str, n: int, latent_dtype: str, row_group: int) -> float:
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with ShardWriter(
        fs,
        root,
        text_tokens=TOKENS,
        text_dim=TEXT_DIM,
        latent_shape=LATENT,
        samples_per_shard=4 * row_group,
        row_group_size=row_group,
        latent_dtype=latent_dtype,
    ) as w:
        for i in range(n):
            tokens = torch.zeros(TOKENS, TEXT_DIM)
            tokens[:REAL_TOKENS] = torch.randn(REAL_TOKENS, TEXT_DIM, generator=gen)
            w.add(f"s{i:05d}", f"caption {i}", tokens, REAL_TOKENS, torch.randn(LATENT, generator=gen))
    return time.perf_counter() - start


def read(fs, root: str, dp_rank: int, dp_size: int, prefetch: int, out: dict) -> None:
    stream = LatentStream(fs, root, dp_rank=dp_rank, dp_size=dp_size, seed=0, buffer_size=16, prefetch=prefetch)
    n = stream.epoch_size()
    start = time.perf_counter()
    nbytes = 0
    for _ in range(n):
        x0, cond = collate(stream.take(1))
        nbytes += x0.numel() * x0.element_size() + cond["tokens"].numel() * cond["tokens"].element_size()
    seconds = time.perf_counter() - start
    stream.close()
    out[dp_rank] = {"samples": n, "seconds": seconds, "samples_per_s": n / seconds, "mb_per_s": nbytes / seconds / 1e6}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--row-group", type=int, default=4)
    p.add_argument("--prefetch", default="1,2,4")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", default="bench_latent_stream.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, running_s3(Path(tmp)) as (url, creds, _):
        scheme, _, host = url.partition("://")
        fs = pafs.S3FileSystem(
            endpoint_override=host,
            scheme=scheme,
            access_key=creds["S3_ACCESS_KEY"],
            secret_key=creds["S3_SECRET_KEY"],
            region="us-east-1",
        )
        for dtype in args.dtypes.split(","):
            root = f"ckpt/bench/{dtype}"
            write_s = write(fs, root, args.samples, dtype, args.row_group)
            for prefetch in (int(v) for v in args.prefetch.split(",")):
                for workers in (1, 2):
                    results: dict[int, dict] = {}
                    threads = [
                        threading.Thread(target=read, args=(fs, root, r, workers, prefetch, results))
                        for r in range(workers)
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    per_worker = [results[r]["samples_per_s"] for r in range(workers)]
                    mb = [results[r]["mb_per_s"] for r in range(workers)]
                    rows.append(
                        {
                            "latent_dtype": dtype,
                            "prefetch": prefetch,
                            "workers": workers,
                            "samples_per_s_per_worker": min(per_worker),
                            "mb_per_s_per_worker": min(mb),
                            "write_samples_per_s": args.samples / write_s,
                        }
                    )
                    r = rows[-1]
                    print(
                        f"{dtype:>9} prefetch {prefetch}  {workers} worker(s): {r['samples_per_s_per_worker']:7.2f} "
                        f"samples/s/worker  {r['mb_per_s_per_worker']:7.1f} MB/s/worker  "
                        f"(write {r['write_samples_per_s']:.2f} samples/s)",
                        flush=True,
                    )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.node(),
        "cpus": torch.get_num_threads(),
        "samples": args.samples,
        "row_group": args.row_group,
        "latent": LATENT,
        "tokens": [TOKENS, TEXT_DIM],
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"{'dtype':>9} {'prefetch':>8} {'workers':>7} {'samples/s/worker':>17} {'MB/s/worker':>12}")
    for r in rows:
        print(
            f"{r['latent_dtype']:>9} {r['prefetch']:>8} {r['workers']:>7} {r['samples_per_s_per_worker']:>17.2f} "
            f"{r['mb_per_s_per_worker']:>12.1f}"
        )


if __name__ == "__main__":
    main()
