"""The API's submission check of a diffusers teacher (service/teachers.py, no torch or diffusers there) mirrors
rcm_core: the same families load the same classes as rcm_core.teachers.FAMILIES, and on the same config.json and
job the API refuses exactly what the worker's check (rcm_core.tasks.diffusers.check_teacher_config, which runs
the family's own check_config) refuses. Configs come from the real diffusers classes (`save_config`)."""

import json
import typing

import pytest

from rcm_core.config import ConfigError, config_from_dict, diffusers_rcm
from rcm_core.tasks.diffusers import check_teacher_config
from rcm_core.teachers import FAMILIES
from service.schemas import JobCreate, TeacherSpec
from service.teachers import FAMILY_CLASSES, LORA_TARGETS, UNSUPPORTED_VARIANTS, teacher_errors
from tests.service.test_teacher_submission import COSMOS, WAN


def test_service_family_table_is_rcm_cores_registry():
    assert {name: f.class_name for name, f in FAMILIES.items()} == FAMILY_CLASSES
    family_field = typing.get_args(TeacherSpec.model_fields["family"].annotation)[0]
    assert set(typing.get_args(family_field)) == set(FAMILY_CLASSES)  # the schema's Literal


def test_service_lora_targets_are_rcm_cores():
    assert {name: f.lora_targets for name, f in FAMILIES.items()} == LORA_TARGETS


def _config(class_name: str, tmp_path, **kwargs) -> dict:
    import diffusers

    getattr(diffusers, class_name)(**kwargs).save_config(str(tmp_path))
    return json.loads((tmp_path / "config.json").read_text())


CASES = [  # (class, config overrides, spec family, latent_shape, cp_degree)
    ("WanTransformer3DModel", {}, None, [4, 2, 4, 4], 2),
    ("WanTransformer3DModel", {}, "wan2.1", [4, 2, 4, 4], 1),
    ("WanTransformer3DModel", {}, "cosmos-predict2", [4, 2, 4, 4], 1),  # family disagrees
    ("WanTransformer3DModel", {"image_dim": 16, "added_kv_proj_dim": 24}, None, [4, 2, 4, 4], 1),  # I2V
    ("WanTransformer3DModel", {"pos_embed_seq_len": 514}, None, [4, 2, 4, 4], 1),  # FLF2V
    ("WanTransformer3DModel", {}, None, [4, 2, 4, 4], 4),  # heads 2 % 4
    ("WanTransformer3DModel", {}, None, [4, 1, 2, 6], 2),  # 3 tokens % 2
    ("WanTransformer3DModel", {}, None, [16, 2, 4, 4], 1),  # channels
    ("WanTransformer3DModel", {}, None, [4, 2, 5, 4], 1),  # patch
    ("WanTransformer3DModel", {"rope_max_seq_len": 2}, None, [4, 2, 8, 4], 1),  # grid (2, 4, 2) past RoPE's 2
    ("CosmosTransformer3DModel", {}, None, [4, 2, 4, 4], 2),
    ("CosmosTransformer3DModel", {}, "wan2.1", [4, 2, 4, 4], 1),
    ("CosmosTransformer3DModel", {"in_channels": 5}, None, [5, 2, 4, 4], 1),  # Video2World's mask channel
    ("CosmosTransformer3DModel", {}, None, [4, 2, 4, 4], 4),
    ("CosmosTransformer3DModel", {}, None, [4, 2, 36, 4], 1),  # grid (2, 18, 2) past max_size's 8 per axis
]


@pytest.mark.parametrize(("cls", "overrides", "family", "latent", "cp"), CASES)
def test_api_refuses_what_the_worker_refuses(tmp_path, cls, overrides, family, latent, cp):
    base = WAN if cls.startswith("Wan") else COSMOS
    config = _config(cls, tmp_path, **{**base, **overrides})
    payload = {
        "name": "x",
        "teacher": {"uri": "s3://ckpt/tenants/a/t/", **({"family": family} if family else {})},
        "data": {"dataset": "teacher-synthetic", "latent_shape": latent},
        "resources": {"num_workers": cp, "cp_degree": cp},
    }
    files = {"config.json", "diffusion_pytorch_model.safetensors"}
    api = teacher_errors(JobCreate.model_validate(payload), json.dumps(config).encode(), files)
    cfg = config_from_dict(
        {"teacher": {"family": family}, "data": {"dataset": "teacher-synthetic", "latent_shape": latent}},
        base=diffusers_rcm(),
    )
    try:
        check_teacher_config(config, cfg, cp)
        worker = None
    except ConfigError as exc:
        worker = str(exc)
    assert bool(api) == (worker is not None), (api, worker)


def test_every_variant_the_api_refuses_is_one_its_family_refuses(tmp_path):
    for family, key, _ in UNSUPPORTED_VARIANTS:
        cls = FAMILY_CLASSES[family]
        value = 16 if key != "pos_embed_seq_len" else 514
        config = _config(cls, tmp_path / key, **{**(WAN if family == "wan2.1" else COSMOS), key: value})
        with pytest.raises(ConfigError):
            FAMILIES[family].check_config(config)
