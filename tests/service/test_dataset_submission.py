"""Submitting a job on a stored dataset (issue 18, item 3): `data: {"uri": "s3://<own prefix>/datasets/x/"}` with a
diffusers teacher. The API checks the tenant prefix first (nothing read otherwise), then reads the dataset's
manifest.json and answers 422 naming the field for a missing or foreign manifest, a text dim that is not the
teacher config's text_dim / text_embed_dim, a latent shape the teacher cannot take, or a prompts-only dataset
with the sCM term on. The real app and SQLite store, the cluster's S3 swapped for a fake; manifests are written by
rcm_core's own Manifest, teacher configs by the real diffusers classes. The same against the real stack:
tests/service/test_e2e_stack.py."""

import pytest

from rcm_core.data.latent_shards import Manifest
from tests.service import test_jobs_api
from tests.service.test_teacher_submission import COSMOS, OWN, WAN, _errors, _submit, config_json

app_and_tokens = test_jobs_api.app_and_tokens  # the API unit tests' app (real app + SQLite, fake cluster)


def manifest(dim=16, latent=(4, 2, 4, 4)) -> bytes:
    return (
        Manifest(
            count=8,
            shards=[{"name": "shard-00000.parquet", "count": 8}],
            text={"tokens": 6, "dim": dim, "dtype": "bfloat16"},
            latent=None if latent is None else {"shape": list(latent), "dtype": "float32"},
        )
        .to_json()
        .encode()
    )


@pytest.fixture(scope="module")
def stored(app_and_tokens, tmp_path_factory):
    """Teacher folders and datasets in tenant-a's prefix (the fake S3)."""
    _, _, cluster, _ = app_and_tokens
    tmp = tmp_path_factory.mktemp("configs")
    for name, body in (
        ("wan/", config_json("WanTransformer3DModel", tmp, **WAN)),
        ("cosmos/", config_json("CosmosTransformer3DModel", tmp, **COSMOS)),
    ):
        cluster.objects[("ckpt", f"tenants/tenant-a/{name}config.json")] = body
        cluster.objects[("ckpt", f"tenants/tenant-a/{name}diffusion_pytorch_model.safetensors")] = b"weights"
    datasets = {
        "good/": manifest(),
        "dim4096/": manifest(dim=4096),
        "c16/": manifest(latent=(16, 2, 4, 4)),
        "odd/": manifest(latent=(4, 2, 5, 4)),
        "prompts/": manifest(latent=None),
        "garbage/": b"SECRET-CONTENT not json",
        "foreign/": b'{"format": "webdataset", "count": 3}',
    }
    for name, body in datasets.items():
        cluster.objects[("ckpt", f"tenants/tenant-a/datasets/{name}manifest.json")] = body
    cluster.objects[("ckpt", "tenants/tenant-a/datasets/unfinished/shard-00000.parquet")] = b"PAR1"
    cluster.objects[("ckpt", "tenants/tenant-b/datasets/good/manifest.json")] = manifest()
    return datasets


def spec(dataset: str, teacher: str = "wan/", **data):
    return {
        "name": "on-a-dataset",
        "teacher": {"uri": OWN + teacher},
        "data": {"uri": OWN + "datasets/" + dataset, **data},
        "schedule": {"steps": 2, "batch_size": 2},
    }


@pytest.mark.parametrize("teacher", ["wan/", "cosmos/"])
def test_create_job_on_a_stored_dataset_is_queued_as_latents(app_and_tokens, stored, teacher):
    r = _submit(app_and_tokens, spec("good/", teacher))
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["data"] == {"uri": OWN + "datasets/good/", "dataset": "latents"}


@pytest.mark.parametrize(
    ("dataset", "teacher", "loc", "expected"),
    [
        ("missing/", "wan/", "uri", "no manifest.json under it: not a finished rcm-latents-v1 dataset"),
        ("unfinished/", "wan/", "uri", "no manifest.json under it"),
        ("garbage/", "wan/", "uri", "its manifest.json is not an rcm-latents-v1 manifest"),
        ("foreign/", "wan/", "uri", "its manifest.json is not an rcm-latents-v1 manifest"),
        ("dim4096/", "wan/", "uri", "the dataset's text.dim is 4096 (its manifest.json), but the teacher's text_dim "),
        ("dim4096/", "cosmos/", "uri", "but the teacher's text_embed_dim is 16"),
        ("c16/", "wan/", "uri", "the dataset's latent shape [16, 2, 4, 4]: C = 16, but the teacher takes in_channels"),
        ("odd/", "wan/", "uri", "(F, H, W) = (2, 5, 4) is not divisible by the teacher's patch_size (1, 2, 2)"),
        ("prompts/", "wan/", "uri", "a prompts-only dataset (no latents): the sCM term needs data latents"),
        ("prompts/", "wan/", "latent_shape", "required with a prompts-only dataset"),
    ],
)
def test_create_job_dataset_the_teacher_cannot_use_422(app_and_tokens, stored, dataset, teacher, loc, expected):
    msg = _errors(_submit(app_and_tokens, spec(dataset, teacher)), ["body", "data", loc])
    assert expected in msg, msg
    assert "SECRET" not in msg and "webdataset" not in msg  # the file is never quoted


def test_create_job_prompts_only_dataset_dmd_only_is_queued(app_and_tokens, stored):
    body = {**spec("prompts/", latent_shape=[4, 2, 4, 4]), "method": {"scm_weight": 0}}
    r = _submit(app_and_tokens, body)
    assert r.status_code == 202, r.text


def test_create_job_latent_shape_other_than_the_datasets_422(app_and_tokens, stored):
    msg = _errors(_submit(app_and_tokens, spec("good/", latent_shape=[4, 2, 8, 8])), ["body", "data", "latent_shape"])
    assert "[4, 2, 8, 8] is not the dataset's latent shape [4, 2, 4, 4]" in msg, msg


def test_create_job_dataset_of_another_tenant_422_before_reading_it(app_and_tokens, stored):
    _, _, cluster, _ = app_and_tokens
    body = spec("good/")
    body["data"]["uri"] = "s3://ckpt/tenants/tenant-b/datasets/good/"
    reads = []
    original = cluster.read_input
    cluster.read_input = lambda *a: reads.append(a) or original(*a)
    try:
        msg = _errors(_submit(app_and_tokens, body), ["body", "data", "uri"])
    finally:
        cluster.read_input = original
    assert "must be an object under your input prefix" in msg and reads == []


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"uri": OWN + "datasets/good"}, "must be a dataset folder s3://bucket/prefix/ (ending in /)"),
        ({"dataset": "latents"}, "uri (the dataset's folder s3://bucket/prefix/) is required"),
        ({"uri": OWN + "datasets/good/", "text_tokens": 8}, "text_tokens is only valid with dataset 'teacher-synth"),
        ({"dataset": "teacher-synthetic", "latent_shape": [4, 2, 4, 4], "uri": OWN + "d/"}, "uri is only valid with"),
        ({"dataset": "ring8", "shuffle_buffer": 4}, "shuffle_buffer is only valid with dataset 'latents'"),
    ],
)
def test_create_job_dataset_fields_out_of_place_422(app_and_tokens, stored, data, expected):
    r = _submit(app_and_tokens, {**spec("good/"), "data": data})
    assert r.status_code == 422 and expected in r.text, r.text
