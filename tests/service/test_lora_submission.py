"""Submitting a LoRA student (student.lora, issue 18 item 6): 422 naming the field for each bad setting (rank,
alpha, dropout, target_modules by schema; a target the teacher's family does not have, from its config.json; LoRA
with a teacher that is not a diffusers folder), and a good one is queued. The same app, store and fake S3 as the
teacher submission tests (tests/service/test_teacher_submission.py); the worker's conversion of the spec:
tests/workers/test_spec_conversion.py; the training: tests/teachers/test_lora_student.py."""

import pytest

from tests.service import test_teacher_submission as teacher_submission
from tests.service.test_teacher_submission import _errors, _submit, spec

app_and_tokens = teacher_submission.app_and_tokens
folders = teacher_submission.folders

LORA = {"rank": 8, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def lora_spec(folder="wan/", **lora):
    return {**spec(folder), "student": {"lora": {**LORA, **lora}}}


@pytest.mark.parametrize(
    ("folder", "targets"),
    [("wan/", ["to_q", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]), ("cosmos/", ["attn1.to_v", "ff.net.2"])],
)
def test_create_job_lora_student_is_queued(app_and_tokens, folders, folder, targets):
    r = _submit(app_and_tokens, lora_spec(folder, target_modules=targets, dropout=0.1))
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["student"]["lora"] == {**LORA, "target_modules": targets, "dropout": 0.1}


@pytest.mark.parametrize(
    ("change", "loc", "expected"),
    [
        ({"rank": 0}, ["rank"], "greater than or equal to 1"),
        ({"rank": 4096}, ["rank"], "less than or equal to 1024"),
        ({"rank": 2.5}, ["rank"], "valid integer"),
        ({"alpha": 0}, ["alpha"], "greater than 0"),
        ({"dropout": 1.0}, ["dropout"], "less than 1"),
        ({"dropout": -0.1}, ["dropout"], "greater than or equal to 0"),
        ({"target_modules": []}, ["target_modules"], "at least 1 item"),
        ({"target_modules": ["to_q", "to_q"]}, ["target_modules"], "names must be distinct"),
        ({"target_modules": ["to_q", "to_k;rm"]}, ["target_modules", 1], "should match pattern"),
        ({"ranks": 8}, ["ranks"], "Extra inputs are not permitted"),
    ],
)
def test_create_job_lora_bad_field_422(app_and_tokens, folders, change, loc, expected):
    msg = _errors(_submit(app_and_tokens, lora_spec(**change)), ["body", "student", "lora", *loc])
    assert expected in msg, msg


def test_create_job_lora_without_rank_or_targets_422(app_and_tokens, folders):
    body = lora_spec()
    del body["student"]["lora"]["rank"], body["student"]["lora"]["target_modules"]
    r = _submit(app_and_tokens, body)
    for field in ("rank", "target_modules"):
        assert "Field required" in _errors(r, ["body", "student", "lora", field])


@pytest.mark.parametrize(
    ("folder", "targets", "bad"),
    [
        ("wan/", ["to_q", "time_proj"], "time_proj"),  # the time path stays full precision and frozen
        ("wan/", ["to_q", "ff.net.2"], "ff.net.2"),  # Cosmos' name for Wan's ffn.net.2
        ("cosmos/", ["to_q", "ffn.net.2"], "ffn.net.2"),
        ("cosmos/", ["to_q", "norm1.linear_1"], "norm1.linear_1"),  # Cosmos' adaLN modulation: time path
    ],
)
def test_create_job_lora_target_not_in_the_teachers_family_422(app_and_tokens, folders, folder, targets, bad):
    msg = _errors(
        _submit(app_and_tokens, lora_spec(folder, target_modules=targets)),
        ["body", "student", "lora", "target_modules", 1],
    )
    family = "wan2.1" if folder == "wan/" else "cosmos-predict2"
    assert f"'{bad}' is not a block linear of the teacher ({family}); one of to_q, to_k" in msg, msg


@pytest.mark.parametrize(
    "body",
    [
        {"name": "toy", "teacher": {"uri": "builtin:toy2d"}},
        {"name": "shapes", "teacher": {"uri": "builtin:shapes"}, "data": {"dataset": "shapes"}},
    ],
)
def test_create_job_lora_with_a_teacher_that_is_not_diffusers_422(app_and_tokens, body):
    r = _submit(app_and_tokens, {**body, "student": {"lora": LORA}})
    msg = _errors(r, ["body"])
    assert "student.lora: LoRA students need a diffusers teacher" in msg, msg
