"""Stored datasets for workers: an rcm-latents-v1 dataset (data.uri s3://bucket/prefix/) opened through pyarrow's
S3 filesystem, its manifest's shapes put into the job's config, and each worker's share of it.

The manifest is authoritative for data.latent_shape and data.text_tokens (the user does not repeat them), so the
entrypoint's teacher checks (rcm_core.tasks.diffusers.check_teacher_config) and the workers see the dataset's own
shapes. A worker reads as its rank in the data-parallel group: the context-parallel ranks of one group share the
same index and so read the same samples (rcm_core.data.latent_stream).
"""

from __future__ import annotations

import dataclasses

from rcm_core.config import ConfigError
from rcm_core.data.latent_shards import Manifest, ShardFormatError, read_manifest
from rcm_core.data.latent_stream import DataAccess
from workers import storage
from workers.spec import JobConfig


def dataset_root(uri: str) -> str:
    """The pyarrow path ("bucket/prefix") of s3://bucket/prefix/."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"data.uri {uri}: a stored dataset is s3://bucket/prefix/")
    return uri.removeprefix("s3://").rstrip("/")


def read_dataset_manifest(uri: str) -> Manifest:
    """Raises: ConfigError naming data.uri (no manifest, not rcm-latents-v1, or S3 unreadable)."""
    try:
        return read_manifest(storage.s3_filesystem(), dataset_root(uri))
    except ShardFormatError as exc:
        raise ConfigError(f"data.uri {uri}: {exc}") from None
    except OSError as exc:  # pyarrow's S3 errors: the message may carry the server's text, so name the type only
        raise ConfigError(f"data.uri {uri}: cannot be read ({type(exc).__name__})") from None


def with_dataset_shapes(job: JobConfig) -> JobConfig:
    """`job` with data.latent_shape (unless prompts-only) and data.text_tokens taken from its dataset's manifest;
    unchanged when the job has no stored dataset."""
    data = job.distill.data
    if data.dataset != "latents" or data.uri is None:
        return job
    manifest = read_dataset_manifest(data.uri)
    shape = list(manifest.latent["shape"]) if manifest.latent else list(data.latent_shape)
    if len(shape) != 4:
        raise ConfigError(f"data.latent_shape: required with the prompts-only dataset {data.uri} (the noise's shape)")
    data = dataclasses.replace(data, latent_shape=shape, text_tokens=int(manifest.text["tokens"]))
    return dataclasses.replace(job, distill=dataclasses.replace(job.distill, data=data))


def data_access(job: JobConfig, dims, device) -> DataAccess | None:
    """This worker's access to the job's stored dataset (None without one): the S3 filesystem, its rank in the
    data-parallel group and the all-gather that assembles the global batch from every rank's share."""
    data = job.distill.data
    if data.dataset != "latents" or data.uri is None:
        return None
    access = DataAccess(fs=storage.s3_filesystem(), root=dataset_root(data.uri))
    if dims is not None and dims.dp_shard_degree > 1:
        import torch
        import torch.distributed as dist

        group, size = dims.dp_group, dims.dp_shard_degree
        access.dp_rank, access.dp_size = dist.get_rank(group), size

        def gather(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device).contiguous()
            out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=device)
            dist.all_gather_into_tensor(out, x, group=group)  # rank order: rank r's rows at r * len(x)
            return out

        access.gather = gather
    return access
