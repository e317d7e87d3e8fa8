"""The rCM step on 2 GPUs (NCCL) equals the 1-GPU step: FSDP=2 and CP=2, float32, fused attention kernel.

Skipped without 2 CUDA devices. Also runnable without pytest: `python -m tests.distributed.test_gpu_parity OUT_DIR`
(writes the measured errors to OUT_DIR/gpu_parity.json either way when RCM_PARITY_REPORT names a file).

Tolerance: float32 with TF32 off. Splitting the batch or the tokens changes the GEMM shapes, and cuBLAS then
picks other kernels and summation orders (~1e-6 relative per layer), which Adam's g / sqrt(v) turns into
slightly different weights by step 3: metrics within 1e-3 relative, and each gradient and weight within
1e-3 of its norm (relative L2 error). A real fault (wrong shard, dropped tangent, averaged gradient) is O(1).
"""

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from tests.distributed import rcm_setup, workers
from tests.distributed.harness import spawn

try:
    import pytest
except ImportError:  # the GPU image may lack pytest; `python -m tests.distributed.test_gpu_parity` still runs
    pytest = None

RTOL = 1e-3
CASES = [(2, 1, "full"), (1, 2, "selective")]

if pytest is not None:
    pytestmark = [
        pytest.mark.gpu,
        pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
    ]


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


def compare(got: dict, ref: dict) -> dict[str, float]:
    """Worst relative error of the metrics, the gradients and the final weights."""
    worst = {"metrics": 0.0, "grads": 0.0, "weights": 0.0}
    for g, r in zip(got["steps"], ref["steps"], strict=True):
        for key, value in r["metrics"].items():
            err = abs(g["metrics"][key] - value) / max(abs(value), 1e-12)
            worst["metrics"] = max(worst["metrics"], err)
        for which in ("student_grads", "fake_grads"):
            for name, grad in r[which].items():
                worst["grads"] = max(worst["grads"], _relative_error(g[which][name], grad))
    for which, params in ref["final"].items():
        for name, param in params.items():
            worst["weights"] = max(worst["weights"], _relative_error(got["final"][which][name], param))
    return worst


def run_gpu_parity(tmp: Path) -> dict:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = rcm_setup.reference_run(torch.float32, device="cuda:0")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": {}}
    for dp, cp, checkpointing in CASES:
        out = tmp / f"dp{dp}_cp{cp}.pt"
        args = (dp, cp, checkpointing, str(out), str(tmp / f"ckpt_{dp}_{cp}"), "float32")
        name = f"dp{dp}_cp{cp}_{checkpointing}"
        try:
            spawn(workers.run_rcm_steps, dp * cp, *args, backend="nccl", timeout=300)
        except Exception as exc:  # keep going: the report then names every failing case
            report["cases"][name] = {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
            continue
        got = torch.load(out)
        case = compare(got, ref)
        case["resume_exact"] = got["resumed_step"]["metrics"] == got["steps"][-1]["metrics"]
        case["losses"] = [s["metrics"]["loss"] for s in got["steps"]]
        report["cases"][name] = case
    report["reference_losses"] = [s["metrics"]["loss"] for s in ref["steps"]]
    if path := os.environ.get("RCM_PARITY_REPORT"):
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def test_rcm_step_on_two_gpus_equals_one_gpu(tmp_path):
    report = run_gpu_parity(tmp_path)
    for name, case in report["cases"].items():
        assert "error" not in case, (name, case.get("error"))
        assert case["resume_exact"], name
        for what in ("metrics", "grads", "weights"):
            assert case[what] < RTOL and math.isfinite(case[what]), (name, what, case[what])


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("RCM_PARITY_REPORT", str(Path(sys.argv[1]) / "gpu_parity.json"))
        test_rcm_step_on_two_gpus_equals_one_gpu(Path(tmp))
