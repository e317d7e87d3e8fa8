"""A diffusers teacher folder as the worker sees it, against a real SeaweedFS (issue 17, item 5): the entrypoint
reads config.json and checks the weights before any Ray Train worker starts (family, shards named by the index,
messages naming what is wrong); every worker downloads exactly config.json, the shards and the index, and loads
them with the family's from_pretrained path."""

import boto3
import pytest
import torch

from rcm_core.config import ConfigError
from rcm_core.teachers import load_diffusers_net
from tests.service.realstack import running_s3
from tests.teachers.wan_tiny import build_wan_tiny, save_wan_tiny
from workers import storage
from workers.entrypoint import resolve_family, resolve_teacher
from workers.spec import job_config

PREFIX = "tenants/demo/"


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
    return client


@pytest.fixture(scope="module")
def folders(s3, tmp_path_factory):
    """Under tenants/demo/: wan/ (4 shards + index, plus a README and a sub-folder the worker must not fetch),
    no-shard/ (one shard deleted), config-only/, weights-only/."""
    _, _, client = s3
    local = save_wan_tiny(tmp_path_factory.mktemp("wan") / "transformer", max_shard_size="40KB")
    files = sorted(p for p in local.iterdir())
    for folder in ("wan/", "no-shard/"):
        for f in files:
            client.upload_file(str(f), "ckpt", PREFIX + folder + f.name)
    client.put_object(Bucket="ckpt", Key=PREFIX + "wan/README.md", Body=b"not a weight")
    client.put_object(Bucket="ckpt", Key=PREFIX + "wan/old/config.json", Body=b"{}")
    shard = next(f.name for f in files if f.name.endswith("-00002-of-00004.safetensors"))
    client.delete_object(Bucket="ckpt", Key=PREFIX + "no-shard/" + shard)
    client.upload_file(str(local / "config.json"), "ckpt", PREFIX + "config-only/config.json")
    client.upload_file(str(local / shard), "ckpt", PREFIX + "weights-only/" + shard)
    return local


def _job(folder: str, family=None, cp=1):
    spec = {
        "teacher": {"uri": f"s3://ckpt/{PREFIX}{folder}", **({"family": family} if family else {})},
        "data": {"dataset": "teacher-synthetic", "latent_shape": [4, 2, 4, 4]},
        "resources": {"num_workers": cp, "cp_degree": cp},
    }
    return job_config(spec, output_dir="unused")


def test_entrypoint_reads_the_family_and_checks_the_shards(env, folders):
    job = _job("wan/", cp=2)
    assert resolve_family(job) == "wan2.1"
    assert resolve_teacher(job) == (job.teacher_uri, "uri")


@pytest.mark.parametrize(
    ("folder", "family", "cp", "error", "expected"),
    [
        ("wan/", "cosmos-predict2", 1, ConfigError, "teacher.family: 'cosmos-predict2' loads CosmosTransformer3DModel"),
        ("wan/", None, 4, ConfigError, "resources.cp_degree: context parallel: num_heads (2) is not divisible"),
        ("no-shard/", None, 1, storage.TeacherUnavailable, "1 of the 4 shards"),
        ("config-only/", None, 1, storage.TeacherUnavailable, "no diffusion_pytorch_model.safetensors and no"),
        ("weights-only/", None, 1, storage.TeacherUnavailable, "no config.json under it: not a diffusers"),
        ("nothing/", None, 1, storage.TeacherUnavailable, "no config.json under it: not a diffusers"),
    ],
)
def test_entrypoint_refuses_a_folder_the_workers_cannot_load(env, folders, folder, family, cp, error, expected):
    with pytest.raises(error) as info:
        resolve_family(_job(folder, family, cp))
    assert expected in str(info.value), str(info.value)


def test_worker_downloads_the_folder_and_loads_it(env, folders, tmp_path):
    local = storage.download_prefix(f"s3://ckpt/{PREFIX}wan/", tmp_path / "teacher")
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in folders.iterdir())  # no README, no old/
    net, family, config = load_diffusers_net(local, dtype=torch.float32)
    assert family.name == "wan2.1" and config["_class_name"] == "WanTransformer3DModel"
    reference = build_wan_tiny().state_dict()  # the weights save_wan_tiny wrote (same seed)
    state = net.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k].to(state[k].dtype)) for k in state)
