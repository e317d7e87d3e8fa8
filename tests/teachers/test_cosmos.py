"""The cosmos-predict2 teacher family against diffusers 0.42.1: conversion, scheduler step, CFG, JVP, checkpointing,
load errors. float64 on CPU with tiny random `CosmosTransformer3DModel`s saved by `save_pretrained` and loaded
back through `rcm_core.teachers.load_diffusers_teacher` (the real `from_pretrained` path).

The reference is the diffusers module called as `Cosmos2TextToImagePipeline.__call__` calls it (lines 588-625):
t = sigma / (sigma + 1), c_in = c_skip = 1 - t, c_out = -t, timestep t, padding_mask zeros(1, 1, H, W), then
D = c_skip x + c_out net, and F = (cos t x_t - D) / sin t with x_t = cos t x (x = x0 + sigma eps).
torchvision: diffusers' forward resizes the padding mask with `torchvision.transforms.functional.resize` (NEAREST),
and torchvision is not installed. The reference call gets a test-only shim in its module global `transforms`
(`F.interpolate(mode="nearest")`, which is what torchvision's tensor NEAREST resize runs; the mask is all zeros,
so any resize gives zeros); the project's net never calls it (it concatenates a zero channel itself).
The pipeline's `noise_pred.float()` upcasts a bf16 prediction to its float32 latents; the latents here are
float64, so the prediction is used in float64.
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from torch.nn import functional as F

from rcm_core.config import ConfigError, LossConfig
from rcm_core.losses.scm import scm_loss, student_time_derivative
from rcm_core.models.flow import FlowModel, guided_f
from rcm_core.parallel.activation_checkpoint import apply_activation_checkpointing
from rcm_core.teachers import FAMILIES, load_diffusers_teacher
from rcm_core.teachers.cosmos import CosmosNet
from tests.teachers.cosmos_tiny import save_tiny_cosmos, tiny_inputs

NEGATIVE_SEED = 7


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # sharded with an index, as the published checkpoints are
    return save_tiny_cosmos(tmp_path_factory.mktemp("cosmos") / "transformer", max_shard_size="20KB")


@pytest.fixture
def resize_shim(monkeypatch):
    """torchvision's NEAREST tensor resize, for the diffusers reference call only (see the module docstring)."""
    import diffusers.models.transformers.transformer_cosmos as module

    def resize(x, size, interpolation=None):
        return F.interpolate(x, size=list(size), mode="nearest")

    shim = types.SimpleNamespace(
        functional=types.SimpleNamespace(resize=resize), InterpolationMode=types.SimpleNamespace(NEAREST="nearest")
    )
    monkeypatch.setattr(module, "transforms", shim, raising=False)


def _diffusers(path):
    import diffusers

    return diffusers.CosmosTransformer3DModel.from_pretrained(str(path), torch_dtype=torch.float64)


def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def pipeline_denoise(model, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, fps=None) -> torch.Tensor:
    """D(x, sigma) exactly as Cosmos2TextToImagePipeline computes it (float64 here), one sigma per sample."""
    dtype = model.dtype
    current_t = sigma / (sigma + 1)
    c_in, c_skip, c_out = 1 - current_t, 1 - current_t, -current_t
    padding_mask = x.new_zeros(1, 1, x.shape[-2], x.shape[-1], dtype=dtype)
    pred = model(
        hidden_states=(x * _b(c_in, x)).to(dtype),
        timestep=current_t.to(dtype),
        encoder_hidden_states=embeds,
        fps=fps,
        padding_mask=padding_mask,
        return_dict=False,
    )[0]
    return _b(c_skip, x) * x + _b(c_out, x) * pred.to(x.dtype)


def pipeline_f(model, x_t, t, embeds, fps=None, guidance=None, negative=None) -> torch.Tensor:
    """TrigFlow F from the pipeline's D (with its CFG D_c + w (D_c - D_u) when `guidance` is given)."""
    sigma = torch.tan(t)
    x = x_t / _b(torch.cos(t), x_t)
    d = pipeline_denoise(model, x, sigma, embeds, fps)
    if guidance is not None:
        d = d + guidance * (d - pipeline_denoise(model, x, sigma, negative, fps))
    return (_b(torch.cos(t), x_t) * x_t - d) / _b(torch.sin(t), x_t)  # x0_hat = cos t x_t - sin t F


def _zeroed(cond):
    return cond["tokens"] * cond["mask"][..., None]


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


T = torch.tensor([0.35, 1.2], dtype=torch.float64)


@pytest.mark.parametrize("frames", [1, 3], ids=["t2i", "video"])
def test_adapter_f_equals_pipeline_call(tiny_dir, resize_shim, frames):
    """match_diffusers_precision: the same float32 islands as diffusers, so only the conversion can differ."""
    teacher = load_diffusers_teacher(tiny_dir, dtype=torch.float64)
    assert isinstance(teacher.net, CosmosNet)
    teacher.net.match_diffusers_precision = True
    reference = _diffusers(tiny_dir)
    x_t, cond = tiny_inputs(frames=frames)
    with torch.no_grad():
        got = teacher(x_t, T, cond)
        want = pipeline_f(reference, x_t, T, _zeroed(cond), fps=None if frames == 1 else 16)
    assert _rel(got, want) < 1e-10


def test_project_precision_is_float64_and_close_to_diffusers(tiny_dir, resize_shim):
    """Default precision: float64 where diffusers rounds to float32 (sinusoid, RoPE, RMSNorm variance): close to
    diffusers within what those float32 roundings allow, and not equal to it (the islands are really float64)."""
    teacher = load_diffusers_teacher(tiny_dir, dtype=torch.float64)
    reference = _diffusers(tiny_dir)
    x_t, cond = tiny_inputs(frames=3)
    with torch.no_grad():
        rel = _rel(teacher(x_t, T, cond), pipeline_f(reference, x_t, T, _zeroed(cond), fps=16))
    assert 1e-12 < rel < 1e-6


def test_state_dict_is_diffusers_layout(tiny_dir):
    teacher = load_diffusers_teacher(tiny_dir, dtype=torch.float64)
    reference = _diffusers(tiny_dir).state_dict()
    got = teacher.net.state_dict()
    assert list(got) == list(reference)
    assert all(torch.equal(got[k], reference[k]) for k in got)


def _cosmos2_scheduler(num_steps: int):
    """FlowMatchEulerDiscreteScheduler as the converted Cosmos-Predict2 pipelines save it and as
    Cosmos2TextToImagePipeline.__init__ / __call__ configure it (Karras sigmas 80 -> 0.002, last dt = 0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    scheduler.register_to_config(sigma_max=80.0, sigma_min=0.002, sigma_data=1.0, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(sigmas=torch.linspace(0, 1, num_steps, dtype=torch.float64).numpy())
    scheduler.sigmas[-1] = scheduler.sigmas[-2]
    return scheduler


def _adapter_step(teacher, x, sigma, sigma_next, cond) -> torch.Tensor:
    """One teacher ODE step through the adapter, in EDM coordinates: the project's DDIM step
    x_t' = cos t' x0_hat + sin t' eps_hat (rcm_core.sampling.sample_euler) at t = atan(sigma)."""
    t, t_next = torch.atan(sigma), torch.atan(sigma_next)
    x_t = x * _b(torch.cos(t), x)
    f = teacher(x_t, t, cond)
    x0 = _b(torch.cos(t), x) * x_t - _b(torch.sin(t), x) * f
    eps = _b(torch.sin(t), x) * x_t + _b(torch.cos(t), x) * f
    return (_b(torch.cos(t_next), x) * x0 + _b(torch.sin(t_next), x) * eps) / _b(torch.cos(t_next), x)


@pytest.mark.parametrize("index", [0, 12, 33])
def test_teacher_ode_step_equals_pipeline_scheduler_step(tiny_dir, resize_shim, index):
    """Tolerance 1e-6: the pipeline works with float32 sigmas and evaluates t = sigma / (sigma + 1), c_in and the
    scheduler's dt = sigma' - sigma in float32 (relative rounding 6e-8 each; measured 1.5e-9, 5.6e-9 and 4.9e-8 at
    steps 0, 12 and 33 of 35, the last near sigma_min = 0.002 where dt is small); the same step with the
    pipeline's update written out in float64 agrees to 1e-10 (measured ~1e-16)."""
    teacher = load_diffusers_teacher(tiny_dir, dtype=torch.float64)
    teacher.net.match_diffusers_precision = True
    reference = _diffusers(tiny_dir)
    scheduler = _cosmos2_scheduler(35)
    sigma32, sigma_next32 = scheduler.sigmas[index], scheduler.sigmas[index + 1]
    x_t, cond = tiny_inputs(batch=2)
    x = (x_t.float() * sigma32).double()  # x = x0 + sigma eps; float32 values, as the pipeline's latents
    embeds = _zeroed(cond)
    with torch.no_grad():
        # the pipeline, line by line (float32 sigma, t, c_in; the scheduler's float32 Euler step)
        current_t = sigma32 / (sigma32 + 1)
        pred = reference(
            hidden_states=x * (1 - current_t),
            timestep=current_t.expand(2).to(torch.float64),
            encoder_hidden_states=embeds,
            padding_mask=x.new_zeros(1, 1, 8, 8),
            return_dict=False,
        )[0]
        d = (1 - current_t) * x + (-current_t) * pred
        eps_like = (x - d) / sigma32
        want = scheduler.step(eps_like, scheduler.timesteps[index], x, return_dict=False)[0]
        sigma, sigma_next = (torch.full((2,), float(v), dtype=torch.float64) for v in (sigma32, sigma_next32))
        got = _adapter_step(teacher, x, sigma, sigma_next, cond)
        # the same EDM Euler update in float64 throughout
        d64 = pipeline_denoise(reference, x, sigma, embeds)
        want64 = x + _b(sigma_next - sigma, x) * (x - d64) / _b(sigma, x)
    assert _rel(got, want64) < 1e-10
    assert _rel(got, want.double()) < 1e-6


def test_cfg_with_negative_prompt_equals_pipeline_guidance(tiny_dir, resize_shim):
    """guided_f with g = guidance_to_project(w) = 1 + w equals the pipeline's D_c + w (D_c - D_u), mapped to F."""
    family = FAMILIES["cosmos-predict2"]
    w = family.default_guidance
    teacher = load_diffusers_teacher(tiny_dir, dtype=torch.float64)
    teacher.net.match_diffusers_precision = True
    reference = _diffusers(tiny_dir)
    x_t, cond = tiny_inputs()
    _, negative = tiny_inputs(seed=NEGATIVE_SEED)
    with torch.no_grad():
        got = guided_f(teacher, x_t, T, cond, negative, family.guidance_to_project(w))
        want = pipeline_f(reference, x_t, T, _zeroed(cond), guidance=w, negative=_zeroed(negative))
        unguided = teacher(x_t, T, cond)
    assert _rel(got, want) < 1e-10
    assert _rel(unguided, want) > 1e-2  # guidance changes F: the comparison is not trivially of F_c


def test_jvp_equals_central_differences_in_x_and_t(tiny_dir):
    teacher = load_diffusers_teacher(tiny_dir, dtype=torch.float64)
    x_t, cond = tiny_inputs(frames=2)
    v = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fn = lambda x, t: teacher(x, t, cond)  # noqa: E731
    h = 1e-6
    with torch.no_grad():
        _, jx = torch.func.jvp(lambda x: fn(x, T), (x_t,), (v,))
        _, jt = torch.func.jvp(lambda t: fn(x_t, t), (T,), (torch.ones_like(T),))
        fdx = (fn(x_t + h * v, T) - fn(x_t - h * v, T)) / (2 * h)
        fdt = (fn(x_t, T + h) - fn(x_t, T - h)) / (2 * h)
    assert _rel(jx, fdx) < 1e-7 and _rel(jt, fdt) < 1e-7
    assert jt.norm() > 1e-2 * jx.norm()  # the t tangent is a real contribution


@pytest.mark.parametrize("load_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16_weights"])
def test_semi_continuous_tangent_matches_exact_float32_compute(tiny_dir, load_dtype):
    """Computed in float32 (weights as loaded, or rounded to bf16 by a bf16 load): the semi-continuous tangent (JVP
    in x, central difference h = 1e-4 in t) equals the exact JVP within 2% (rCM Sec. 4), and the time part is a
    real contribution. (With the blocks computing in bf16 the difference quotient is dominated by the bf16
    rounding of the activations, whatever the time path does: measured 20x off on this model.)"""
    teacher = load_diffusers_teacher(tiny_dir, dtype=load_dtype).float()
    x_t, cond = tiny_inputs(frames=2)
    x_t, cond = x_t.float(), {"tokens": cond["tokens"].float(), "mask": cond["mask"]}
    v = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))
    fn = lambda x, t: teacher(x, t, cond)  # noqa: E731
    f_exact, df_exact = student_time_derivative(fn, x_t, T, v, mode="exact", fd_step=1e-4)
    f_semi, df_semi = student_time_derivative(fn, x_t, T, v, mode="semi_continuous", fd_step=1e-4)
    torch.testing.assert_close(f_semi, f_exact)
    assert _rel(df_semi, df_exact) < 2e-2
    with torch.no_grad():
        _, df_spatial = torch.func.jvp(lambda x: fn(x, T), (x_t,), (v,))
    assert _rel(df_spatial, df_exact) > 0.05  # the time part matters


def _time_path_outputs(net: CosmosNet, t: torch.Tensor) -> torch.Tensor:
    """Everything the net computes from the time alone: time embedding, every block's and the output's modulation."""
    from rcm_core import trigflow

    temb, embedded = net.time_embed(trigflow.rf_time_from_trigflow(t))
    mods = [m(embedded, temb) for m in net.time_path_modules()[1:]]
    return torch.cat([temb, embedded, *(c for chunks in mods for c in chunks)], dim=-1)


def test_time_path_resolves_the_finite_difference_with_bf16_weights(tiny_dir):
    """bf16 weights: the time path computes in float32 from the float64 time, so its central difference at
    h = 1e-4 equals its exact JVP within 2%; diffusers' own time path (sinusoid cast to the bf16 hidden states,
    bf16 linears) does not resolve it. (End to end, the bf16 activations downstream round F itself to 2^-8
    relative, which no time path can undo: the semi-continuous tangent through a bf16 network is noisy per
    element; see the float32 test above for the end-to-end check.)"""
    teacher = load_diffusers_teacher(tiny_dir, dtype=torch.bfloat16)
    net = teacher.net
    assert net.time_embed.t_embedder.linear_1.weight.dtype == torch.bfloat16
    h = 1e-4
    with torch.no_grad():
        out, exact = torch.func.jvp(lambda t: _time_path_outputs(net, t), (T,), (torch.ones_like(T),))
        fd = (_time_path_outputs(net, T + h) - _time_path_outputs(net, T - h)) / (2 * h)
    assert out.dtype == torch.float32
    assert _rel(fd, exact) < 2e-2
    # diffusers' path at the same weights: the float32 sinusoid is cast to the bf16 hidden states' dtype
    reference = _diffusers_bf16(tiny_dir)
    hidden = torch.zeros(2, 1, 1, dtype=torch.bfloat16)
    with torch.no_grad():
        from rcm_core import trigflow

        def diffusers_time_path(t):
            temb, embedded = reference.time_embed(hidden, trigflow.rf_time_from_trigflow(t).to(torch.bfloat16))
            return torch.cat([temb, embedded], dim=-1).float()

        fd_ref = (diffusers_time_path(T + h) - diffusers_time_path(T - h)) / (2 * h)
    assert _rel(fd_ref, exact[:, : fd_ref.shape[-1]]) > 0.5  # temb and embedded come first in both


def _diffusers_bf16(path):
    import diffusers

    return diffusers.CosmosTransformer3DModel.from_pretrained(str(path), torch_dtype=torch.bfloat16)


def _scm_grads(student: FlowModel, teacher: FlowModel, x0, cond, t, eps) -> dict[str, torch.Tensor]:
    teacher_fn = lambda x, tt: teacher(x, tt, cond)  # noqa: E731
    loss, _ = scm_loss(student, teacher_fn, x0, cond, t=t, eps=eps, r=1.0, config=LossConfig())
    student.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(tiny_dir, policy):
    teacher = load_diffusers_teacher(tiny_dir, dtype=torch.float64)
    plain = load_diffusers_teacher(tiny_dir, dtype=torch.float64)
    checkpointed = load_diffusers_teacher(tiny_dir, dtype=torch.float64)
    apply_activation_checkpointing(checkpointed.net, policy)
    x0, cond = tiny_inputs(frames=2)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want = _scm_grads(plain, teacher, x0, cond, T, eps)
    got = _scm_grads(checkpointed, teacher, x0, cond, T, eps)
    assert got.keys() == want.keys() and len(want) == len(list(plain.parameters()))
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_context_parallel_check_names_the_sizes(tiny_dir):
    net = load_diffusers_teacher(tiny_dir, dtype=torch.float64).net
    net.check_context_parallel(2, num_tokens=16)
    with pytest.raises(ValueError, match=r"num_heads \(2\).*cp_degree \(4\)"):
        net.check_context_parallel(4)
    with pytest.raises(ValueError, match=r"15 tokens"):
        net.check_context_parallel(2, num_tokens=15)


def _edited_config(tiny_dir, tmp_path, **changes):
    """A copy of the tiny checkpoint's directory whose config.json has `changes` (None deletes the key)."""
    target = tmp_path / "transformer"
    target.mkdir()
    for item in tiny_dir.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    config = json.loads((target / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"in_channels": 5}, "in_channels"),  # Video2World: condition-mask channel
        ({"controlnet_block_every_n": 1}, "controlnet_block_every_n"),
        ({"img_context_dim_in": 16}, "img_context_dim_in"),
        ({"use_crossattn_projection": True}, "use_crossattn_projection"),
        ({"extra_pos_embed_type": "learnable"}, "extra_pos_embed_type"),
        ({"extra_pos_embed_type": None}, "extra_pos_embed_type"),  # absent: the class default "learnable"
    ],
    ids=["video2world", "controlnet", "img_context", "crossattn_proj", "learnable_pos", "pos_default"],
)
def test_unsupported_variants_are_refused_naming_the_key(tiny_dir, tmp_path, changes, key):
    path = _edited_config(tiny_dir, tmp_path, **changes)
    with pytest.raises(ConfigError, match=key):
        load_diffusers_teacher(path, dtype=torch.float64)


def test_a_real_video2world_checkpoint_is_refused(tmp_path):
    """A Video2World-shaped model (17 in / 16 out as published; here 5 / 4) saved by diffusers itself."""
    path = save_tiny_cosmos(tmp_path / "transformer", in_channels=5)
    with pytest.raises(ConfigError, match=r"in_channels \(5\) != out_channels \(4\)"):
        load_diffusers_teacher(path)


def test_family_guidance_maps_cosmos_form_to_project_form():
    family = FAMILIES["cosmos-predict2"]
    assert family.class_name == "CosmosTransformer3DModel"
    assert family.default_guidance == 7.0 and family.guidance_to_project(7.0) == 8.0
    assert math.isclose(family.guidance_to_project(0.0), 1.0)  # w = 0: conditional only


def test_a_cosmos_student_saves_back_in_diffusers_layout(tiny_dir, tmp_path):
    """CosmosNet.to_diffusers + save_pretrained (sharded): the student's exact weights under diffusers' keys, and
    loaded again through load_diffusers_teacher it gives the same F."""
    student = load_diffusers_teacher(tiny_dir, dtype=torch.float64)
    with torch.no_grad():  # a trained student differs from the teacher it started as
        for p in student.parameters():
            p.add_(0.01)
    path = tmp_path / "transformer"
    student.net.to_diffusers().save_pretrained(str(path), max_shard_size="20KB")
    assert (path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_diffusers_teacher(path, dtype=torch.float64)
    expected, got = student.net.state_dict(), loaded.net.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    x_t, cond = tiny_inputs(frames=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_t, T, cond), student(x_t, T, cond), rtol=0, atol=0)
