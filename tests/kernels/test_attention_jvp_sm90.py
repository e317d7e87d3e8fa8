"""Tests for the warp-specialised Hopper kernel (rcm_core/kernels/attention_jvp_sm90.py) and its dispatch.

Without a GPU: the kernel is built for sm_90a offline with the installed Triton and ptxas (no device needed),
and ptxas must not serialise its wgmma (warnings C7514/C7515, which undo the overlap the kernel exists for);
the build must use setmaxnreg, TMA and wgmma and fit in shared memory; the dispatch rule is checked on
stand-in tensors. On a Hopper GPU, with NaN-poisoned outputs: each mode's results against the float64 oracle,
the LSE, gradients through O, and the same calls with the Gluon path switched off.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import triton

from rcm_core.kernels import (
    attention,
    attention_forward,
    attention_jvp,
    attention_jvp_forward,
    attention_jvp_ref,
    attention_jvp_sm90,
)
from tests.kernels.test_attention_jvp import check, kernel_module, make_inputs, rel_l2

IS_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
SMEM_LIMIT = 232448  # bytes of shared memory a Hopper CTA may use (227 KiB)


@pytest.mark.skipif(not attention_jvp_sm90.available(), reason="this Triton has no Gluon")
@pytest.mark.parametrize("mode", ["fused", "tangent", "primal"])
@pytest.mark.parametrize("head_dim", sorted(attention_jvp_sm90.SM90_TILES))
def test_builds_for_hopper_without_serialised_wgmma(tmp_path, head_dim, mode):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    build = [sys.executable, "-m", "tests.kernels.sm90_build", str(head_dim), str(tmp_path), mode]
    subprocess.run(build, env=env, check=True, capture_output=True, timeout=300)
    ptx = (tmp_path / "k.ptx").read_text()
    shared = json.loads((tmp_path / "meta.json").read_text())["shared"]
    assert ptx.count("setmaxnreg") >= 3, "warp specialisation with register reallocation is missing"
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx, "expected wgmma fed by TMA"
    assert 0 < shared <= SMEM_LIMIT, f"{shared} B of shared memory"
    ptxas = _ptxas_for_sm90()
    report = subprocess.run(
        [ptxas, "-arch=sm_90a", "-v", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    # C7514/C7515: ptxas serialises every wgmma because registers of one in flight are touched; that would
    # undo the overlap this kernel exists for. (Spills are not asserted: the Triton 3.6 / ptxas 12.x build
    # that ran on the H100 keeps them out of the key loop, but the count moves with the compiler version.)
    assert "C7514" not in report and "C7515" not in report, report
    assert re.search(r"Used \d+ registers", report), report


def _ptxas_for_sm90() -> str:
    """The ptxas Triton itself uses for sm_90 (Triton 3.9 ships a newer one beside the legacy binary)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError):
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


class _Stand:
    """What `_sm90_eligible` reads of a tensor, without a GPU."""

    def __init__(self, shape=(1, 2, 256, 128), dtype=torch.bfloat16, is_cuda=True, ptr=1 << 20):
        self.shape, self.dtype, self.is_cuda, self.device, self._ptr = shape, dtype, is_cuda, "cuda:0", ptr

    def data_ptr(self):
        return self._ptr

    def stride(self):
        B, H, N, D = self.shape
        return (H * N * D, N * D, D, 1)

    def element_size(self):
        return 2 if self.dtype != torch.float32 else 4


@pytest.mark.parametrize(
    "change, expected",
    [
        ({}, True),
        ({"env": "0"}, False),
        ({"capability": 8}, False),
        ({"capability": 10}, False),
        ({"dtype": torch.float32}, False),
        ({"head_dim": 64}, True),
        ({"head_dim": 32}, False),
        ({"head_dim": 256}, False),
        ({"drop": "k_t"}, False),
        ({"kv_seqlens": True}, False),
        ({"is_cuda": False}, False),
        ({"unaligned": True}, False),
        ({"no_keys": True}, False),
    ],
    ids=lambda x: str(x),
)
def test_dispatch_rule(monkeypatch, change, expected):
    if change.get("env"):
        monkeypatch.setenv("RCM_ATTN_SM90", change["env"])
    monkeypatch.setattr(kernel_module, "_interpreting", lambda: False)
    monkeypatch.setattr(attention_jvp_sm90, "available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (change.get("capability", 9), 0))
    shape = (1, 2, 256, change.get("head_dim", 128))
    kw = dict(shape=shape, dtype=change.get("dtype", torch.bfloat16), is_cuda=change.get("is_cuda", True))
    q, k, v, q_t, k_t, v_t = (_Stand(**kw) for _ in range(6))
    if change.get("no_keys"):
        k, v, k_t, v_t = (_Stand(**{**kw, "shape": (1, 2, 0, 128)}) for _ in range(4))
    if change.get("unaligned"):
        k_t = _Stand(**kw, ptr=(1 << 20) + 2)
    tangents = {"q_t": q_t, "k_t": k_t, "v_t": v_t}
    if change.get("drop"):
        tangents[change["drop"]] = None
    kv = object() if change.get("kv_seqlens") else None
    assert kernel_module._sm90_eligible(q, k, v, tangents["q_t"], tangents["k_t"], tangents["v_t"], kv) is expected
    # the primal mode needs no tangents (the unaligned tensor here is a tangent); every other rule is the same
    primal_expected = expected or bool(change.get("drop") or change.get("unaligned"))
    assert kernel_module._sm90_eligible(q, k, v, None, None, None, kv, need_tangents=False) is primal_expected


# -- Hopper only ----------------------------------------------------------------------------------------------------


def _spy(monkeypatch, name: str) -> list:
    """Count the calls of attention_jvp_sm90.<name> (the Gluon launcher) while still running it."""
    calls, real = [], getattr(attention_jvp_sm90, name)
    monkeypatch.setattr(attention_jvp_sm90, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 1000, 1000, 128),
        (1, 2, 777, 450, 128),
        (1, 4, 4096, 4096, 128),
        (1, 2, 8190, 77, 128),
        (2, 3, 1000, 1000, 64),
        (1, 2, 777, 450, 64),
        (2, 4, 4096, 4096, 64),
    ],
)
def test_sm90_kernel_matches_reference(gen, monkeypatch, shape, dtype):
    inputs = make_inputs(gen, *shape, dtype)
    assert kernel_module._sm90_eligible(*inputs, None), "these inputs should take the Gluon kernel"
    calls = _spy(monkeypatch, "fused_forward")
    o, o_t, lse = attention_jvp_forward(*inputs)
    assert calls, "the Gluon kernel did not run"
    ref_o, ref_o_t = attention_jvp_ref(*inputs)
    same_o, same_o_t = attention_jvp_ref(*inputs, upcast=False)
    check("o", o, same_o, ref_o)
    check("o_t", o_t, same_o_t, ref_o_t)
    q, k = inputs[0].double(), inputs[1].double()
    ref_lse = torch.logsumexp(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4
    # the Triton kernel on the same inputs agrees to rounding
    monkeypatch.setenv("RCM_ATTN_SM90", "0")
    o2, o_t2, _ = attention_jvp_forward(*inputs)
    assert rel_l2(o, o2) < 1e-2 and rel_l2(o_t, o_t2) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 1000, 4100, 128), (1, 2, 777, 4096, 64), (2, 4, 4096, 4096, 64)])
def test_sm90_tangent_kernel_under_func_jvp(gen, monkeypatch, shape, dtype):
    """torch.func.jvp through `attention` (the DiT's path): the jvp rule runs the Gluon tangent kernel."""
    inputs = make_inputs(gen, *shape, dtype)
    calls = _spy(monkeypatch, "tangent_forward")
    o, o_t = torch.func.jvp(attention, inputs[:3], inputs[3:])
    assert calls, "the Gluon tangent kernel did not run"
    short = tuple(x[:, :, :2000] if i in (1, 2, 4, 5) else x for i, x in enumerate(inputs))
    torch.func.jvp(attention, short[:3], short[3:])
    assert len(calls) == 1, f"fewer than {attention_jvp_sm90.TANGENT_MIN_KEYS} keys should stay on Triton"
    ref_o, ref_o_t = attention_jvp_ref(*inputs)
    same_o, same_o_t = attention_jvp_ref(*inputs, upcast=False)
    check("o", o, same_o, ref_o)
    check("o_t", o_t, same_o_t, ref_o_t)
    monkeypatch.setenv("RCM_ATTN_SM90", "0")
    _, o_t2 = torch.func.jvp(attention, inputs[:3], inputs[3:])
    assert rel_l2(o_t, o_t2) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 1000, 1000, 128), (1, 2, 777, 450, 64), (1, 4, 4096, 4096, 128)])
def test_sm90_primal_kernel_matches_reference(gen, monkeypatch, shape, dtype):
    inputs = make_inputs(gen, *shape, dtype)
    calls = _spy(monkeypatch, "primal_forward")
    o, lse = attention_forward(*inputs[:3])
    assert calls, "the Gluon primal kernel did not run"
    check("o", o, attention_jvp_ref(*inputs[:3], upcast=False)[0], attention_jvp_ref(*inputs[:3])[0])
    q, k = inputs[0].double(), inputs[1].double()
    ref_lse = torch.logsumexp(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    assert (lse.double() - ref_lse).abs().max().item() < 1e-4
    # backward through `attention` reads the primal's saved LSE
    grads = []
    for flag in ("1", "0"):
        monkeypatch.setenv("RCM_ATTN_SM90", flag)
        leaves = [x.detach().clone().requires_grad_() for x in inputs[:3]]
        (attention(*leaves).float() * torch.linspace(-1, 1, shape[-1], device="cuda")).sum().backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads, strict=True):
        assert torch.isfinite(a).all() and rel_l2(a, b) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not IS_HOPPER, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sm90_gradient_through_o_matches_triton_path(gen, monkeypatch, head_dim):
    inputs = make_inputs(gen, 1, 2, 1000, 600, head_dim, torch.bfloat16)
    grads = []
    for flag in ("1", "0"):
        monkeypatch.setenv("RCM_ATTN_SM90", flag)
        q, k, v = (x.detach().clone().requires_grad_() for x in inputs[:3])
        o, o_t = attention_jvp(q, k, v, *inputs[3:])
        (o.float() * torch.linspace(-1, 1, o.shape[-1], device=o.device)).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.isfinite(a).all() and rel_l2(a, b) < 1e-2
