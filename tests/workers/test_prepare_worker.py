"""workers/prepare.py (what `POST /v1/datasets` runs on the cluster) against real S3 (SeaweedFS): a tiny random Wan
pipeline folder and a prompt file in the tenant's inputs -> an rcm-latents-v1 dataset under datasets/<name>/ with
its manifest; a second run over it is refused (nothing overwritten); errors name the URIs, never local paths.
Through the whole service: tests/service/test_e2e_stack.py."""

import json

import pytest

from rcm_core.config import ConfigError

INPUTS = "s3://ckpt/tenants/t/"


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    from tests.service.realstack import running_s3
    from tests.teachers.pipeline_tiny import save_wan_pipeline

    tmp = tmp_path_factory.mktemp("prepare")
    pipe = save_wan_pipeline(tmp / "pipe")
    (tmp / "prompts.txt").write_text("a red cat on the mat\na big dog runs\na small blue sky\n")
    with running_s3(tmp / "s3") as (url, creds, s3):
        for f in (p for p in pipe.rglob("*") if p.is_file()):
            s3.upload_file(str(f), "ckpt", f"tenants/t/pipe/{f.relative_to(pipe).as_posix()}")
        s3.upload_file(str(tmp / "prompts.txt"), "ckpt", "tenants/t/prompts.txt")
        env = {"RCM_S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": creds["S3_ACCESS_KEY"], "RCM_CHECKPOINT_BUCKET": "ckpt"}
        env["AWS_SECRET_ACCESS_KEY"] = creds["S3_SECRET_KEY"]
        yield {"s3": s3, "env": env}


def _run(stored, monkeypatch, **request):
    from workers import prepare

    for k, v in stored["env"].items():
        monkeypatch.setenv(k, v)
    base = {"prompts_uri": INPUTS + "prompts.txt", "pipeline_uri": INPUTS + "pipe/", "max_sequence_length": 6}
    return prepare.run({**base, **request})


def test_prepare_worker_writes_the_dataset_and_refuses_to_overwrite_it(stored, monkeypatch):
    out = INPUTS + "datasets/synth/"
    summary = _run(stored, monkeypatch, out_uri=out, synthesize=True, latent_shape=[4, 2, 4, 4], steps=2,
                   samples_per_shard=2)  # fmt: skip
    assert summary["count"] == 3 and summary["shards"] == 2
    body = stored["s3"].get_object(Bucket="ckpt", Key="tenants/t/datasets/synth/manifest.json")["Body"].read()
    manifest = json.loads(body)
    assert manifest["count"] == 3 and manifest["latent"]["shape"] == [4, 2, 4, 4] and manifest["text"]["dim"] == 24
    with pytest.raises(ConfigError, match="already holds a dataset") as info:
        _run(stored, monkeypatch, out_uri=out)
    assert "/tmp" not in str(info.value)


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({"prompts_uri": INPUTS + "none.txt"}, "prompts.uri s3://ckpt/tenants/t/none.txt: cannot read it"),
        ({"pipeline_uri": INPUTS + "nothing/"}, "pipeline.uri s3://ckpt/tenants/t/nothing/: no files under it"),
        ({"synthesize": True, "latent_shape": [3, 2, 4, 4]}, "latent_shape: 3 channels"),
    ],
)
def test_prepare_worker_errors_name_the_uri(stored, monkeypatch, request_, expected):
    with pytest.raises(ConfigError) as info:
        _run(stored, monkeypatch, out_uri=INPUTS + "datasets/bad/", **request_)
    assert expected in str(info.value) and "/tmp" not in str(info.value)
