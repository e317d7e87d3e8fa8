"""Failure reasons shown through the API never echo file contents, worker temp paths or storage internals
(issue 15, finding 3): the backends' filter of Ray's job message, the worker's one-line training error, and
the S3 error summary of teacher and prompt-file downloads."""

from botocore.exceptions import ClientError, EndpointConnectionError

from service.cluster import public_failure
from service.kuberay import rayjob_state
from workers.entrypoint import public_error
from workers.storage import s3_reason

RAY_MESSAGE = (
    "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
    "Traceback (most recent call last):\n"
    '  File "/tmp/rcm-1234abcd-xyz/run/prompts.txt", line 3\n'
    "ValueError: not a caption of the shapes grammar: 'AWS_SECRET_ACCESS_KEY=hunter2'\n"
    "rcm-worker: error: data.prompt_file_uri s3://ckpt/tenants/a/p.txt, line 3: not a caption\n"
)


def test_public_failure_keeps_only_the_worker_error_line():
    reason = public_failure(RAY_MESSAGE)
    assert reason == "rcm-worker: error: data.prompt_file_uri s3://ckpt/tenants/a/p.txt, line 3: not a caption"


def test_public_failure_without_a_worker_line_keeps_rays_first_line_only():
    message = RAY_MESSAGE.replace("rcm-worker: error:", "something else:")
    assert public_failure(message) == "Job entrypoint command failed with exit code 1"
    assert public_failure(None) is None


def test_kuberay_failure_message_is_filtered_the_same_way():
    status = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": RAY_MESSAGE}
    _, message = rayjob_state({"metadata": {}, "status": status})
    assert "hunter2" not in message and "/tmp/" not in message and "line 3: not a caption" in message


def test_public_error_is_one_line_without_local_paths():
    err = RuntimeError(
        "Training failed.\nTraceback:\n  File /home/ray/x.py\n"
        "FileNotFoundError: /tmp/rcm-1234abcd-xyz/teacher.safetensors missing (s3://ckpt/tenants/a/t)"
    )
    text = public_error(err)
    assert "\n" not in text and "/tmp/" not in text and "/home/" not in text
    assert text == "FileNotFoundError: <path> missing (s3://ckpt/tenants/a/t)"


def test_s3_reason_names_the_kind_of_failure_only():
    def client_error(code):
        return ClientError({"Error": {"Code": code, "Message": "secret detail /bucket/key"}}, "HeadObject")

    assert s3_reason(client_error("404")) == "no such object"
    assert s3_reason(client_error("403")) == "access denied"
    assert s3_reason(EndpointConnectionError(endpoint_url="http://10.0.0.5:8333/ckpt/x")) == "storage unavailable"
