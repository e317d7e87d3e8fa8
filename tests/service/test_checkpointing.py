"""Checkpoints are complete before anyone trusts them (issue 15, finding 8), against a real SeaweedFS:
rank 0 publishes manifest.json only once every rank's shard is on S3 at its size, GET /checkpoints
(service/cluster.py) lists only checkpoints whose manifest lists files that are all present, and a worker
resumes from the newest complete checkpoint, skipping a newer incomplete one."""

import json
import threading
import time

import boto3
import pytest
import torch
from torch import nn

from rcm_core.checkpoint import load_checkpoint, save_checkpoint
from service.cluster import RayCluster
from service.settings import Settings
from tests.service.realstack import running_s3
from workers import checkpointing

JOB = "0f6a4f4e-5a0e-4c43-9b8e-00000000c0de"


class App:
    """A minimal `Stateful` (what the Distiller is to rcm_core.checkpoint)."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.net = nn.Linear(4, 3)

    def state_dict(self):
        return {"net": self.net.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with running_s3(tmp_path_factory.mktemp("s3")) as (url, creds, client):
        yield url, creds, client


@pytest.fixture
def env(s3, monkeypatch):
    url, creds, client = s3
    monkeypatch.setenv("RCM_S3_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["S3_ACCESS_KEY"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["S3_SECRET_KEY"])
    monkeypatch.setenv("RCM_CHECKPOINT_BUCKET", "ckpt")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # boto3 caches the first credentials a process resolves
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="ckpt", Prefix=checkpointing.run_prefix(JOB)):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket="ckpt", Key=obj["Key"])
    settings = Settings(S3_ENDPOINT_URL=url, S3_ACCESS_KEY=creds["S3_ACCESS_KEY"], S3_SECRET_KEY=creds["S3_SECRET_KEY"])
    return client, RayCluster(settings)


def _save(app, tmp_path, step):
    """rcm_core's save, as every rank does it; returns (dir, the manifest rank 0 wrote, the shard files)."""
    path = save_checkpoint(app, tmp_path / f"local-{step}", step, extra={"recovery_count": 0, "train_seconds": 1.0})
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").unlink()
    return path, manifest, checkpointing.local_files(path)


def _upload(client, path, prefix, names):
    for name in names:
        client.upload_file(str(path / name), "ckpt", prefix + name)


def test_manifest_lands_only_after_every_rank_shard_is_present(env, tmp_path):
    client, cluster = env
    path, manifest, files = _save(App(0), tmp_path, 20)
    (path / "__1_0.distcp").write_bytes(b"rank 1's shard" * 100)  # a second rank's shard, uploaded by that rank
    files = {**files, "__1_0.distcp": (path / "__1_0.distcp").stat().st_size}
    prefix = checkpointing.run_prefix(JOB) + checkpointing.checkpoint_dir_name(20, 0) + "/"
    _upload(client, path, prefix, [n for n in files if n != "__1_0.distcp"])  # rank 0's upload has returned
    assert not checkpointing.wait_for_files(client, "ckpt", prefix, files, timeout_s=1.0)
    assert cluster.checkpoints(JOB) == []

    late = threading.Timer(1.0, _upload, (client, path, prefix, ["__1_0.distcp"]))  # rank 1 finishes later
    late.start()
    start = time.monotonic()
    assert checkpointing.wait_for_files(client, "ckpt", prefix, files, timeout_s=30.0)
    assert time.monotonic() - start >= 0.9  # it did wait for rank 1
    late.join()
    checkpointing.publish_manifest(client, "ckpt", prefix, manifest, files)
    listed = cluster.checkpoints(JOB)
    assert [c["step"] for c in listed] == [20] and listed[0]["uri"] == f"s3://ckpt/{prefix.rstrip('/')}"
    published = json.loads(client.get_object(Bucket="ckpt", Key=prefix + "manifest.json")["Body"].read())
    assert published["files"] == files and published["step"] == 20


@pytest.mark.parametrize("damage", ["no file list", "a shard missing", "a shard of another size"])
def test_checkpoints_lists_nothing_without_a_complete_manifest(env, tmp_path, damage):
    client, cluster = env
    path, manifest, files = _save(App(0), tmp_path, 30)
    prefix = checkpointing.run_prefix(JOB) + "checkpoint-000000030-r0/"
    _upload(client, path, prefix, files)
    if damage == "no file list":  # what rank 0 wrote before this fix: a manifest naming no files
        client.put_object(Bucket="ckpt", Key=prefix + "manifest.json", Body=json.dumps(manifest).encode())
    else:
        shard = next(n for n in files if n.endswith(".distcp"))
        if damage == "a shard missing":
            client.delete_object(Bucket="ckpt", Key=prefix + shard)
        else:
            client.put_object(Bucket="ckpt", Key=prefix + shard, Body=b"truncated")
        checkpointing.publish_manifest(client, "ckpt", prefix, manifest, files)
    assert cluster.checkpoints(JOB) == []
    assert checkpointing.complete_checkpoints(client, "ckpt", JOB) == []


def test_resume_takes_the_newest_complete_checkpoint(env, tmp_path):
    client, cluster = env
    good, newer = App(1), App(2)
    for app, step, complete in ((good, 20, True), (newer, 40, False)):
        path, manifest, files = _save(app, tmp_path, step)
        prefix = checkpointing.run_prefix(JOB) + checkpointing.checkpoint_dir_name(step, 0) + "/"
        _upload(client, path, prefix, [n for n in files if complete or not n.endswith(".distcp")])
        checkpointing.publish_manifest(client, "ckpt", prefix, manifest, files)  # step 40: a shard never landed
    assert [c["step"] for c in cluster.checkpoints(JOB)] == [20]
    resumed = App(3)
    with checkpointing.restore_latest(JOB) as d:
        assert d is not None
        assert load_checkpoint(resumed, d)["step"] == 20
    assert torch.equal(resumed.net.weight, good.net.weight) and not torch.equal(resumed.net.weight, newer.net.weight)


def test_resume_without_any_complete_checkpoint_starts_fresh(env):
    with checkpointing.restore_latest(JOB) as d:
        assert d is None
