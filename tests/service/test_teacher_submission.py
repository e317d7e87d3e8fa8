"""Submitting a diffusers teacher (issue 17, item 5): the API reads the folder's config.json from the caller's own
prefix and answers 422 naming the field for a folder that is not a diffusers transformer, an unsupported class,
a family that disagrees, or a latent / cp_degree the model cannot take; a good folder is queued (202). The real
app and SQLite store, the cluster's S3 swapped for a fake; the config.json files are written by the real
diffusers classes (`save_config`). The same refusals against the real stack's SeaweedFS:
tests/service/test_e2e_stack.py."""

import json

import pytest

from service.teachers import teacher_errors
from tests.service import test_jobs_api
from tests.service.test_jobs_api import _h

app_and_tokens = test_jobs_api.app_and_tokens  # the API unit tests' app (real app + SQLite, fake cluster)

OWN = "s3://ckpt/tenants/tenant-a/"
WAN = dict(  # a tiny Wan2.1 T2V transformer: 2 heads, patch (1, 2, 2)
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=1,
    rope_max_seq_len=32,
)
COSMOS = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=12,
    num_layers=1,
    text_embed_dim=16,
    adaln_lora_dim=8,
    max_size=(4, 16, 16),
    patch_size=(1, 2, 2),
    rope_scale=(1.0, 1.0, 1.0),
    extra_pos_embed_type=None,
)


def config_json(class_name: str, tmp_path, **kwargs) -> bytes:
    """config.json as `save_config` of the real diffusers class writes it."""
    import diffusers

    folder = tmp_path / class_name
    getattr(diffusers, class_name)(**kwargs).save_config(str(folder))
    return (folder / "config.json").read_bytes()


def spec(folder: str, *, family=None, latent=(4, 2, 4, 4), cp=1, **teacher):
    resources = {"num_workers": cp, "cp_degree": cp} if cp > 1 else {}
    return {
        "name": "diffusers",
        "teacher": {"uri": OWN + folder, **({"family": family} if family else {}), **teacher},
        "data": {"dataset": "teacher-synthetic", "latent_shape": list(latent), "text_tokens": 8},
        "resources": resources,
        "schedule": {"steps": 2, "batch_size": 2},
    }


@pytest.fixture(scope="module")
def folders(app_and_tokens, tmp_path_factory):
    """Teacher folders in tenant-a's prefix (the fake S3): name -> config.json bytes (None: no config.json)."""
    _, _, cluster, _ = app_and_tokens
    tmp = tmp_path_factory.mktemp("configs")
    wan = config_json("WanTransformer3DModel", tmp, **WAN)
    made = {
        "wan/": wan,
        "cosmos/": config_json("CosmosTransformer3DModel", tmp, **COSMOS),
        "wan-i2v/": config_json("WanTransformer3DModel", tmp / "i2v", **WAN, image_dim=16, added_kv_proj_dim=24),
        "cosmos-v2w/": config_json("CosmosTransformer3DModel", tmp / "v2w", **{**COSMOS, "in_channels": 5}),
        "unet/": json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}).encode(),
        "garbage/": b"SECRET-CONTENT not json",
        "list/": b"[1, 2, 3]",
        "weights-only/": None,
        "config-only/": wan,
    }
    for name, body in made.items():
        if body is not None:
            cluster.objects[("ckpt", f"tenants/tenant-a/{name}config.json")] = body
        if name != "config-only/":
            cluster.objects[("ckpt", f"tenants/tenant-a/{name}diffusion_pytorch_model.safetensors")] = b"weights"
    cluster.objects[("ckpt", "tenants/tenant-b/wan/config.json")] = wan
    return made


def _submit(app_and_tokens, body):
    client, tokens, _, _ = app_and_tokens
    before = client.get("/v1/jobs", headers=_h(tokens["a"])).json()["data"]
    r = client.post("/v1/jobs", json=body, headers=_h(tokens["a"]))
    if r.status_code == 422:  # a refused job is not stored
        assert client.get("/v1/jobs", headers=_h(tokens["a"])).json()["data"] == before
    return r


def _errors(r, loc):
    assert r.status_code == 422, r.text
    found = [e for e in r.json()["detail"] if e["loc"] == loc]
    assert found, r.json()
    return found[0]["msg"]


@pytest.mark.parametrize(("folder", "family"), [("wan/", None), ("wan/", "wan2.1"), ("cosmos/", "cosmos-predict2")])
def test_create_job_diffusers_teacher_folder_is_queued(app_and_tokens, folders, folder, family):
    r = _submit(app_and_tokens, spec(folder, family=family, cp=2))
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["teacher"]["uri"] == OWN + folder


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("weights-only/", "not a diffusers transformer folder"),  # no config.json
        ("missing/", "not a diffusers transformer folder"),  # nothing there at all
        ("config-only/", "no weights under it (diffusion_pytorch_model.safetensors or"),
        ("garbage/", "is not a diffusers model config"),
        ("list/", "is not a diffusers model config"),
        ("unet/", "is not a supported one; supported: WanTransformer3DModel (wan2.1), CosmosTransformer3DModel"),
        ("wan-i2v/", "a Wan image-to-video transformer (image_dim is set)"),
        ("cosmos-v2w/", "a Cosmos Video2World transformer"),
    ],
)
def test_create_job_teacher_folder_that_is_not_a_supported_transformer_422(app_and_tokens, folders, folder, expected):
    msg = _errors(_submit(app_and_tokens, spec(folder)), ["body", "teacher", "uri"])
    assert expected in msg, msg
    assert "SECRET" not in msg and "UNet2DConditionModel" not in msg  # the file is never quoted


def test_create_job_teacher_family_disagreeing_with_config_422(app_and_tokens, folders):
    msg = _errors(_submit(app_and_tokens, spec("wan/", family="cosmos-predict2")), ["body", "teacher", "family"])
    assert "'cosmos-predict2' loads CosmosTransformer3DModel, but teacher.uri holds a wan2.1 model" in msg, msg


@pytest.mark.parametrize(
    ("latent", "cp", "loc", "expected"),
    [
        ((4, 2, 4, 4), 4, "cp_degree", "num_attention_heads (2) is not divisible by cp_degree (4)"),
        ((4, 1, 2, 6), 2, "cp_degree", "the latent's 3 tokens (data.latent_shape / patch_size) are not divisible"),
        ((16, 2, 4, 4), 1, "latent_shape", "C = 16, but the teacher takes in_channels = 4"),
        ((4, 2, 5, 4), 1, "latent_shape", "(F, H, W) = (2, 5, 4) is not divisible by the teacher's patch_size"),
        ((4, 2, 68, 4), 1, "latent_shape", "grid (2, 34, 2) after patch_size exceeds the teacher's 32 RoPE positions"),
    ],
)
def test_create_job_latent_or_cp_degree_the_teacher_cannot_take_422(app_and_tokens, folders, latent, cp, loc, expected):
    body = spec("wan/", latent=latent, cp=cp)
    parent = "resources" if loc == "cp_degree" else "data"
    msg = _errors(_submit(app_and_tokens, body), ["body", parent, loc])
    assert expected in msg, msg


def test_create_job_teacher_folder_of_another_tenant_422_before_reading_it(app_and_tokens, folders):
    client, tokens, cluster, _ = app_and_tokens
    body = spec("wan/")
    body["teacher"]["uri"] = "s3://ckpt/tenants/tenant-b/wan/"
    reads = []
    original = cluster.read_input
    cluster.read_input = lambda *a: reads.append(a) or original(*a)
    try:
        msg = _errors(_submit(app_and_tokens, body), ["body", "teacher", "uri"])
    finally:
        cluster.read_input = original
    assert "must be an object under your input prefix" in msg and reads == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"teacher": {"uri": OWN + "t.safetensors"}}, "goes with data.dataset 'teacher-synthetic'"),
        ({"data": {"dataset": "ring8"}}, "goes with data.dataset 'teacher-synthetic'"),
        ({"data": {"dataset": "teacher-synthetic"}}, "latent_shape [C, F, H, W] is required"),
        ({"data": {"dataset": "shapes", "latent_shape": [4, 1, 2, 2]}}, "only valid with dataset 'teacher-synthetic'"),
        ({"teacher": {"uri": OWN + "t.safetensors", "family": "wan2.1"}}, "family is only valid for a diffusers"),
        ({"teacher": {"uri": OWN + "wan/", "family": "wan2.2"}}, "Input should be 'wan2.1' or 'cosmos-predict2'"),
    ],
)
def test_create_job_diffusers_fields_out_of_place_422(app_and_tokens, folders, change, expected):
    r = _submit(app_and_tokens, {**spec("wan/"), **change})
    assert r.status_code == 422 and expected in r.text, r.text


def test_teacher_errors_never_read_more_than_the_cap():
    """An oversized config.json (over MAX_CONFIG_BYTES) is refused as not a config, without parsing it whole."""
    from service.schemas import JobCreate
    from service.teachers import MAX_CONFIG_BYTES

    job = JobCreate.model_validate(spec("wan/"))
    big = b'{"_class_name": "WanTransformer3DModel", "pad": "' + b"x" * MAX_CONFIG_BYTES + b'"}'
    errors = teacher_errors(job, big, {"config.json", "diffusion_pytorch_model.safetensors"})
    assert [e["loc"] for e in errors] == [("body", "teacher", "uri")] and "not a diffusers model config" in errors[0][
        "msg"
    ]


def test_upload_folder_then_submit_it(app_and_tokens, tmp_path):
    """`RcmClient.upload_folder` (`rcm upload DIR`) puts a save_pretrained folder's files under NAME/ and returns
    the folder URI a job names; the job is queued."""
    from rcm_client import RcmClient

    client, tokens, cluster, _ = app_and_tokens
    import diffusers

    model = diffusers.WanTransformer3DModel(**WAN)
    model.save_pretrained(str(tmp_path / "transformer"), max_shard_size="40KB")
    rcm = RcmClient("http://testserver", tokens["a"])
    rcm.http = client  # the in-process app (TestClient is an httpx.Client)
    client.headers["Authorization"] = f"Bearer {tokens['a']}"
    try:
        out = rcm.upload_folder(tmp_path / "transformer", "mine/transformer")
    finally:
        del client.headers["Authorization"]
    assert out["uri"] == OWN + "mine/transformer/"
    files = {p.name for p in (tmp_path / "transformer").iterdir()}
    assert {k.removeprefix("tenants/tenant-a/mine/transformer/") for b, k in cluster.objects if "mine/" in k} == files
    assert "diffusion_pytorch_model.safetensors.index.json" in files  # sharded: 2+ shards and the index
    r = _submit(app_and_tokens, spec("mine/transformer/"))
    assert r.status_code == 202, r.text


def test_rcm_upload_of_an_empty_folder_exits_2_with_one_line(tmp_path, capsys):
    from rcm_client.cli import run_job_command

    (tmp_path / "empty").mkdir()
    assert run_job_command(["--url", "http://127.0.0.1:9", "upload", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no files in this folder" in err
