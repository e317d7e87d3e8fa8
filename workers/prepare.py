"""What a dataset request's Ray job runs (`python -m workers.prepare`): `rcm data prepare` on the cluster.

The API (`POST /v1/datasets`, service/api/routes/datasets.py) has checked the request (name, bounds, every URI
under the caller's input prefix, no dataset at the destination) and submitted this entry point through the Ray
Jobs API with RCM_DATASET_REQUEST (JSON: prompts_uri, pipeline_uri, out_uri and the prepare options) and the S3
endpoint. It downloads the prompt file and the diffusers pipeline folder (model_index.json, tokenizer/,
text_encoder/, vae/, and transformer/ with `synthesize`), then runs the same code as the CLI
(rcm_core.data.prepare.prepare_dataset), which writes the shards to out_uri and the manifest last (it refuses a
destination that already holds a dataset, so nothing stored is overwritten even if two requests race).
A user-fixable error ends with one `rcm-worker: error:` line (local paths replaced by the URIs), exit 1.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from rcm_core.config import ConfigError
from workers import storage

MAX_PIPELINE_FILES = 10_000  # a diffusers pipeline has tens of files; more means a wrong prefix


def download_folder(uri: str, dest: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """Every object under the folder `uri` (s3://bucket/prefix/), sub-folders included, into `dest`; top-level
    sub-folders named in `skip` are left in S3.

    Raises:
        ConfigError: unreadable, empty, or over MAX_PIPELINE_FILES objects.
    """
    bucket, prefix = storage.split_uri(uri.rstrip("/") + "/")
    client = storage.s3_client()
    try:
        keys = [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])
            if not o["Key"].endswith("/")  # folder markers
        ]
        if not keys:
            raise ConfigError(f"pipeline.uri {uri}: no files under it")
        if len(keys) > MAX_PIPELINE_FILES:
            raise ConfigError(f"pipeline.uri {uri}: over {MAX_PIPELINE_FILES} files: not a diffusers pipeline folder")
        for key in keys:
            rel = key.removeprefix(prefix)
            if rel.split("/", 1)[0] in skip:
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(dest / rel))
    except (ClientError, BotoCoreError) as exc:
        raise ConfigError(f"pipeline.uri {uri}: cannot read it ({storage.s3_reason(exc)})") from None
    return dest


def run(request: dict) -> dict:
    """Download the inputs and prepare the dataset at request["out_uri"]; returns prepare_dataset's summary."""
    import torch

    from rcm_core.data.prepare import PrepareConfig, prepare_dataset

    with tempfile.TemporaryDirectory(prefix="rcm-prepare-") as tmp:
        work = Path(tmp)
        prompts_uri, pipeline_uri = request["prompts_uri"], request["pipeline_uri"]
        prompts = work / "prompts.txt"
        bucket, key = storage.split_uri(prompts_uri)
        try:
            storage.s3_client().download_file(bucket, key, str(prompts))
        except (ClientError, BotoCoreError) as exc:
            raise ConfigError(f"prompts.uri {prompts_uri}: cannot read it ({storage.s3_reason(exc)})") from None
        skip = () if request.get("synthesize") else ("transformer",)  # only synthesis runs the transformer
        pipeline = download_folder(pipeline_uri, work / "pipeline", skip=skip)
        shape = request.get("latent_shape")
        cfg = PrepareConfig(
            prompts=str(prompts),
            pipeline=str(pipeline),
            out=request["out_uri"],
            synthesize=bool(request.get("synthesize")),
            latent_shape=tuple(shape) if shape else None,
            steps=int(request.get("steps", 50)),
            guidance=request.get("guidance"),
            negative_prompt=request.get("negative_prompt"),
            seed=int(request.get("seed", 0)),
            batch_size=int(request.get("batch_size", 8)),
            samples_per_shard=int(request.get("samples_per_shard", 256)),
            max_sequence_length=int(request.get("max_sequence_length", 512)),
            dtype=request.get("dtype", "float32"),
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
        try:
            return prepare_dataset(cfg, progress=lambda line: print(line, flush=True))
        except ConfigError as exc:  # its messages name the local copies: name the URIs instead
            text = str(exc).replace(str(prompts), prompts_uri).replace(str(pipeline), pipeline_uri.rstrip("/"))
            for flag, field in (("--out", "name"), ("--latent-shape", "latent_shape"), ("--pipeline", "pipeline.uri")):
                text = text.replace(flag, field)  # the request's field names, not the CLI's
            raise ConfigError(text) from None


def main() -> int:
    request = json.loads(os.environ["RCM_DATASET_REQUEST"])
    try:
        summary = run(request)
    except ConfigError as exc:
        print(f"rcm-worker: error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"rcm-worker: dataset {request['out_uri']}: {summary['count']} samples in {summary['shards']} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
