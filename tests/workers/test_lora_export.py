"""workers/train_loop.py's export of a LoRA student (one worker, in process): the job spec's student.lora reaches
the Distiller through workers.spec, and `_export` writes the report and diffusers' LoRA file (no transformer/),
lists every file in the manifest it writes last, and registers the version with the rcm.lora lineage tag. S3 and
MLflow are this module's collaborators, replaced by recorders here; the real ones: tests/service/test_e2e_stack.py
(a full student; a LoRA job was not run through the stack)."""

import json

import torch

from rcm_core import pipeline
from rcm_core.export import LORA_WEIGHTS, MANIFEST, TRANSFORMER_DIR
from rcm_core.teachers.lora import is_adapter
from service.schemas import JobCreate
from tests.teachers.wan_tiny import save_wan_tiny
from workers import storage, train_loop
from workers.spec import job_config

LORA = {"rank": 2, "alpha": 4, "target_modules": ["to_q", "attn2.to_k", "ffn.net.2"]}


class RecordingLog:
    def __init__(self):
        self.registered: list[tuple[str, str, dict]] = []

    def metrics(self, metrics, step=0):
        pass

    def artifacts(self, directory):
        pass

    def register_model(self, name, source, tags):
        self.registered.append((name, source, tags))
        return f"{name}/1"


def test_worker_exports_a_lora_student_and_registers_it(tmp_path, monkeypatch):
    teacher_dir = save_wan_tiny(tmp_path / "transformer")
    body = {
        "name": "lora",
        "teacher": {"uri": "s3://ckpt/tenants/t/wan/", "family": "wan2.1"},
        "student": {"lora": LORA},
        "data": {"dataset": "teacher-synthetic", "latent_shape": [4, 2, 4, 4], "text_tokens": 6, "num_prompts": 2},
        "method": {"critic_ratio": 1, "lr": 1e-3},
        "schedule": {"steps": 1, "batch_size": 2},
        "eval": {"num_samples": 10, "teacher_steps": [2]},
        "export": {"registered_model_name": "t.wan-lora"},
    }
    spec = JobCreate.model_validate(body).model_dump(mode="json", exclude_unset=True)
    job = job_config(spec, output_dir=str(tmp_path / "run"), teacher_path=str(teacher_dir))
    teacher_net, meta, _ = pipeline.get_teacher(job.distill)
    distiller = pipeline.build_distiller(job.distill, teacher_net, meta)
    distiller.train_step()
    uploaded, manifests = {}, {}
    monkeypatch.setenv("RCM_CHECKPOINT_BUCKET", "ckpt")
    monkeypatch.setattr(storage, "upload", lambda path, uri: uploaded.setdefault(uri, path.stat().st_size))
    monkeypatch.setattr(storage, "put_json", lambda payload, key: manifests.setdefault(key, payload))
    log = RecordingLog()
    train_loop._export(distiller, teacher_net, meta, job, "job-7", log)
    prefix = "s3://ckpt/jobs/job-7/export/"
    manifest = manifests["jobs/job-7/export/" + MANIFEST]
    assert {prefix + name for name in manifest["files"]} == set(uploaded)
    assert LORA_WEIGHTS in manifest["files"] and not any(n.startswith(TRANSFORMER_DIR) for n in manifest["files"])
    out = tmp_path / "run" / "export"
    adapters = {n for n, _ in distiller.student.named_parameters() if is_adapter(n)}
    assert len(adapters) == 2 * 4 * 2  # A and B; to_q of both attentions, attn2.to_k, ffn.net.2; 2 blocks
    rcm = json.loads((out / "rcm.json").read_text())
    assert rcm["lora"] == {"rank": 2, "alpha": 4.0, "target_modules": LORA["target_modules"], "dropout": 0.0}
    assert rcm["spec"]["student"]["lora"] == rcm["lora"]  # the effective spec carries it too
    [(name, source, tags)] = log.registered
    assert (name, source) == ("t.wan-lora", prefix)
    assert json.loads(tags["rcm.lora"]) == rcm["lora"] and tags["rcm.teacher"] == "s3://ckpt/tenants/t/wan/"
    # the EMA student's adapters are what was written (one step moved B off zero)
    from safetensors.torch import load_file

    written = load_file(str(out / LORA_WEIGHTS))
    ema = {k: v for k, v in distiller.ema.model.net.state_dict().items() if is_adapter(k)}
    assert written.keys() == {"transformer." + k.replace(".default.", ".") for k in ema}
    for k, v in ema.items():
        assert torch.equal(written["transformer." + k.replace(".default.", ".")], v)
    assert any(v.abs().max() > 0 for k, v in written.items() if ".lora_B." in k)
