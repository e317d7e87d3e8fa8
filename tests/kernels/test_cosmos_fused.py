"""A tiny Cosmos-Predict2 teacher with the fused attention kernel (self and cross attention) equals the math path:
the student's sCM loss and its gradients (the JVP of sCM's tangent runs through the kernel's jvp rule).

On CPU the kernel runs through Triton's interpreter (fp32, small shapes: conftest.py); on a GPU it is compiled.
Head dim 32: the smallest the kernel supports.
"""

import pytest
import torch

from rcm_core.config import LossConfig
from rcm_core.losses.scm import scm_loss
from rcm_core.models.flow import FlowModel
from rcm_core.teachers.cosmos import CosmosNet
from tests.teachers.cosmos_tiny import save_tiny_cosmos, tiny_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_cosmos(tmp_path_factory.mktemp("cosmos") / "transformer", attention_head_dim=32)


def _student(path, backend: str) -> FlowModel:
    import diffusers

    module = diffusers.CosmosTransformer3DModel.from_pretrained(str(path), torch_dtype=torch.float32)
    return FlowModel(CosmosNet.from_diffusers(module, attention_backend=backend), "rf").to(DEVICE)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_scm_loss_gradients_with_fused_kernel_match_math_path(tiny_dir):
    math_student, fused_student = _student(tiny_dir, "math"), _student(tiny_dir, "fused")
    teacher = _student(tiny_dir, "math").eval().requires_grad_(False)
    x0, cond = tiny_inputs(frames=1)
    x0 = x0.float().to(DEVICE)
    cond = {"tokens": cond["tokens"].float().to(DEVICE), "mask": cond["mask"].to(DEVICE)}
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64, device=DEVICE)
    teacher_fn = lambda x, tt: teacher(x, tt, cond)  # noqa: E731
    results = {}
    calls = []
    fused_core = fused_student.net.blocks[0].attn1.core_attention
    fused_student.net.blocks[0].attn1.core_attention = lambda *a: calls.append(1) or fused_core(*a)
    for name, student in (("math", math_student), ("fused", fused_student)):
        loss, _ = scm_loss(student, teacher_fn, x0, cond, t=t, eps=eps, r=1.0, config=LossConfig())
        loss.backward()
        grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
        results[name] = (loss.detach(), grads)
    assert calls and fused_core.keywords["backend"] == "fused"
    (loss_m, grads_m), (loss_f, grads_f) = results["math"], results["fused"]
    assert abs(loss_f.item() - loss_m.item()) <= 1e-4 * abs(loss_m.item())
    assert grads_f.keys() == grads_m.keys() and len(grads_m) == len(list(math_student.parameters()))
    for name, grad in grads_m.items():
        assert _rel(grads_f[name], grad) < 1e-3, name
