"""The wan2.1 family: WanNet over a tiny random diffusers WanTransformer3DModel, loaded the way a user loads it.

Faithfulness (float64, CPU): F from `load_diffusers_teacher` equals F computed from the diffusers model called
as WanPipeline calls it (timestep 1000 sigma of shape (B,), padded text rows zeroed, no mask), then converted
to TrigFlow by hand; one teacher ODE step equals FlowMatchEulerDiscreteScheduler's and UniPC's first step; CFG
equals the pipeline's uncond + w (cond - uncond). JVP: torch.func.jvp through FlowModel(WanNet) equals central
finite differences; the semi-continuous tangent equals the exact one under bf16 weights; sCM gradients with
the fused attention kernel (Triton interpreter on CPU) equal the math path's; checkpointing changes nothing.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from rcm_core import trigflow
from rcm_core.config import ConfigError, LossConfig
from rcm_core.losses.scm import scm_loss, student_time_derivative
from rcm_core.models.flow import FlowModel, guided_f
from rcm_core.parallel.activation_checkpoint import apply_activation_checkpointing
from rcm_core.teachers import FAMILIES, detect_family, load_diffusers_teacher, read_config
from rcm_core.teachers.wan import WanNet
from tests.teachers.wan_tiny import build_wan_tiny, save_wan_tiny, wan_inputs

FAITHFUL_RTOL = 1e-10
FD_STEP = 1e-6  # central differences in float64: truncation ~1e-12, rounding ~1e-10
FD_TOL = {"rtol": 1e-6, "atol": 1e-7}


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_wan_tiny(tmp_path_factory.mktemp("wan") / "transformer", max_shard_size="20KB")


def diffusers_model(path, dtype=torch.float64):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(str(path), torch_dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _bc(c: torch.Tensor) -> torch.Tensor:
    return c[:, None, None, None, None]


@torch.no_grad()
def pipeline_velocity(model, x_s, sigma, tokens, mask):
    """The transformer call of WanPipeline.__call__: timestep (B,) = 1000 sigma, padded rows zero, no mask."""
    prompt_embeds = tokens * mask[..., None].to(tokens.dtype)
    return model(hidden_states=x_s, timestep=1000.0 * sigma, encoder_hidden_states=prompt_embeds, return_dict=False)[0]


def pipeline_f(model, x_t, t, cond):
    """TrigFlow F from the pipeline's velocity, by the SNR-matching formulas written out here."""
    c, s = torch.cos(t), torch.sin(t)
    sigma = s / (c + s)
    x_s = x_t / _bc(c + s)
    v = pipeline_velocity(model, x_s, sigma, cond["tokens"], cond["mask"])
    return _bc(c - s) * x_s + v / _bc(c + s)


def test_family_is_registered_and_state_dict_keys_are_diffusers(wan_dir):
    fam = detect_family(read_config(wan_dir))
    assert fam is FAMILIES["wan2.1"] and fam.default_guidance == 5.0 and fam.guidance_to_project(5.0) == 5.0
    teacher = load_diffusers_teacher(wan_dir)
    assert isinstance(teacher, FlowModel) and isinstance(teacher.net, WanNet)
    reference = diffusers_model(wan_dir, None).state_dict()
    got = teacher.net.state_dict()
    assert list(got) == list(reference)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_f_equals_the_pipeline_f_in_float64(wan_dir):
    teacher = load_diffusers_teacher(wan_dir, dtype=torch.float64)
    model = diffusers_model(wan_dir)
    x, t, cond = wan_inputs()
    ref = pipeline_f(model, x, t, cond)
    teacher.net.match_diffusers_precision = True  # round where diffusers rounds to float32
    with torch.no_grad():
        got = teacher(x, t, cond)
    torch.testing.assert_close(got, ref, rtol=FAITHFUL_RTOL, atol=FAITHFUL_RTOL * ref.abs().max().item())
    # the project's precision (float64 islands) differs only by diffusers' float32 roundings
    teacher.net.match_diffusers_precision = False
    with torch.no_grad():
        got = teacher(x, t, cond)
    assert 1e-9 < _rel(got, ref) < 1e-5
    # the padded text rows matter: not zeroing them changes the reference, so the test sees the mask
    unmasked = dict(cond, mask=torch.ones_like(cond["mask"]))
    assert _rel(pipeline_f(model, x, t, unmasked), ref) > 1e-3


def _ddim_step(teacher, x_s, sigma, sigma_next, cond):
    """The TrigFlow DDIM step x_t' = cos(t - t') x_t - sin(t - t') F(x_t, t), in RF coordinates."""
    t, t_next = trigflow.trigflow_time_from_rf(sigma), trigflow.trigflow_time_from_rf(sigma_next)
    x_t = x_s * _bc(torch.cos(t) + torch.sin(t))
    with torch.no_grad():
        f = teacher(x_t, t, cond)
    x_next = _bc(torch.cos(t - t_next)) * x_t - _bc(torch.sin(t - t_next)) * f
    return x_next / _bc(torch.cos(t_next) + torch.sin(t_next))


@pytest.mark.parametrize(
    ("scheduler_name", "step"),
    [("flow_match_euler", 0), ("flow_match_euler", 4), ("unipc", 0)],  # UniPC is first order at its first step only
)
def test_one_teacher_ode_step_equals_the_scheduler_step(wan_dir, scheduler_name, step):
    """Tolerance 1e-6: the schedulers hold sigmas in float32 and FlowMatchEuler casts the sample to float32 (and
    UniPC takes its log-SNR coefficients from float32 sigmas), i.e. ~1e-7 relative per operation; a wrong
    conversion (sign, timestep scale, input scale) is off by O(1e-2) or more."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if scheduler_name == "unipc":  # the scheduler the Wan2.1 diffusers repos ship (shift 3 for 480p)
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        )
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    teacher = load_diffusers_teacher(wan_dir, dtype=torch.float64)
    teacher.net.match_diffusers_precision = True
    model = diffusers_model(wan_dir)
    x, _, cond = wan_inputs()
    b = x.shape[0]
    sigma, sigma_next = (sched.sigmas[i].double().expand(b) for i in (step, step + 1))  # the same noise levels
    x_s = x  # latents at sigma_step
    # the pipeline's scheduler step on the transformer's velocity at sigma_0
    v = pipeline_velocity(model, x_s, sigma, cond["tokens"], cond["mask"])
    ref = sched.step(v, sched.timesteps[step], x_s, return_dict=False)[0].double()  # step index from the timestep
    got = _ddim_step(teacher, x_s, sigma, sigma_next, cond)
    assert sigma_next[0] < sigma[0] - 0.01  # a real step
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert _rel(got, x_s) > 1e-2  # the step moves the latents far more than the tolerance


def test_cfg_equals_the_pipeline_guidance_with_a_negative_prompt(wan_dir):
    """guided_f runs cond and uncond as one batch, the pipeline as two calls. With diffusers' keep-in-fp32 modules
    (the time embedder) left float32, a float32 GEMM's rounding depends on the batch size (7e-8 here, in diffusers'
    own forward too), so both sides are cast to float64 throughout for this comparison."""
    fam = FAMILIES["wan2.1"]
    teacher = load_diffusers_teacher(wan_dir, dtype=torch.float64).to(torch.float64)
    teacher.net.match_diffusers_precision = True
    model = diffusers_model(wan_dir).to(torch.float64)
    x, t, cond = wan_inputs()
    gen = torch.Generator().manual_seed(7)
    # a negative prompt's embedding: one real token (like "" -> EOS), the rest padding
    neg_tokens = torch.randn(cond["tokens"].shape, generator=gen, dtype=torch.float64)
    neg_mask = torch.zeros_like(cond["mask"])
    neg_mask[:, 0] = True
    neg = {"tokens": neg_tokens, "mask": neg_mask}
    w = fam.default_guidance
    c, s = torch.cos(t), torch.sin(t)
    x_s, sigma = x / _bc(c + s), s / (c + s)
    v_cond = pipeline_velocity(model, x_s, sigma, cond["tokens"], cond["mask"])
    v_uncond = pipeline_velocity(model, x_s, sigma, neg_tokens, neg_mask)
    v = v_uncond + w * (v_cond - v_uncond)  # WanPipeline: noise_uncond + guidance_scale * (noise_pred - noise_uncond)
    ref = _bc(c - s) * x_s + v / _bc(c + s)
    with torch.no_grad():
        got = guided_f(teacher, x, t, cond, neg, fam.guidance_to_project(w))
    torch.testing.assert_close(got, ref, rtol=FAITHFUL_RTOL, atol=FAITHFUL_RTOL * ref.abs().max().item())
    assert _rel(v, v_cond) > 1e-2  # guidance does something here


def _float64_teacher(seed=0, **overrides) -> FlowModel:
    model = build_wan_tiny(seed=seed, dtype=torch.float64, **overrides)
    return FlowModel(WanNet.from_diffusers(model), "rf")


def _central_difference(fn, x, v, h=FD_STEP):
    return (fn(x + h * v) - fn(x - h * v)) / (2 * h)


def _richardson(fn, x, v):
    """Central differences with their h^2 error term cancelled: Wan's timestep is 1000 s, so the sinusoid's top
    frequencies make the third derivative in t ~1e9 and plain central differences at h = 1e-6 err by ~1e-6."""
    return (4 * _central_difference(fn, x, v, FD_STEP / 2) - _central_difference(fn, x, v)) / 3


@torch.no_grad()
def test_jvp_equals_finite_differences_in_x_and_in_t():
    teacher = _float64_teacher()
    x, t, cond = wan_inputs()
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, tangent_x = torch.func.jvp(lambda a: teacher(a, t, cond), (x,), (v,))
    torch.testing.assert_close(tangent_x, _central_difference(lambda a: teacher(a, t, cond), x, v), **FD_TOL)
    ones = torch.ones_like(t)
    _, tangent_t = torch.func.jvp(lambda tt: teacher(x, tt, cond), (t,), (ones,))
    torch.testing.assert_close(tangent_t, _richardson(lambda tt: teacher(x, tt, cond), t, ones), **FD_TOL)
    assert tangent_x.abs().max() > 0.1 and tangent_t.abs().max() > 0.1
    # the network's own time dependence (not only the RF <-> TrigFlow coefficients) is in the t tangent
    net_t = torch.func.jvp(lambda s: teacher.net(x, s, cond), (trigflow.rf_time_from_trigflow(t),), (ones,))[1]
    assert net_t.abs().max() > 1e-3


@torch.no_grad()
def _time_projection_fd(time_proj_fn, t: torch.Tensor) -> torch.Tensor:
    """Central difference in TrigFlow t (h = 1e-4, sCM's semi-continuous step) of a timestep projection of s(t)."""
    fn = lambda tt: time_proj_fn(trigflow.rf_time_from_trigflow(tt)).double()  # noqa: E731
    return (fn(t + 1e-4) - fn(t - 1e-4)) / 2e-4


def test_time_path_finite_difference_is_resolved_with_bf16_weights(wan_dir):
    """bf16 weights as diffusers loads them: the net's time path (sinusoid from float64 s, time embedder, time
    projection) runs in float32, so a 1e-4 step in t is resolved; diffusers' own time path, called with the
    pipeline's bf16 prompt embeddings, rounds the embedding to bf16 and loses it."""
    x, t, cond = wan_inputs(dtype=torch.float32)
    exact_net = load_diffusers_teacher(wan_dir, dtype=torch.float64).to(torch.float64).net
    with torch.no_grad():  # d/dt of the float64 time projection, exactly
        _, exact = torch.func.jvp(
            lambda tt: exact_net.time_embedding(trigflow.rf_time_from_trigflow(tt), torch.float64)[1].flatten(1),
            (t,),
            (torch.ones_like(t),),
        )

    net = load_diffusers_teacher(wan_dir, dtype=torch.bfloat16).net
    ours = _time_projection_fd(lambda ss: net.time_embedding(ss, torch.bfloat16)[1].flatten(1), t)
    assert _rel(ours, exact) < 2e-2

    model = diffusers_model(wan_dir, torch.bfloat16)  # the pipeline's transformer, not adopted by a WanNet
    text = cond["tokens"].to(torch.bfloat16)
    theirs_fn = lambda ss: model.condition_embedder(1000.0 * ss.float(), text)[1]  # noqa: E731
    theirs = _time_projection_fd(theirs_fn, t)
    assert _rel(theirs, exact) > 0.1


def test_semi_continuous_tangent_matches_exact_with_bf16_weights_and_float32_compute(wan_dir):
    """The whole net: weights rounded to bf16 (loaded in bf16), computed in float32. With the blocks themselves
    computing in bf16 the finite difference is dominated by bf16 rounding of the activations (a 1e-4 step moves
    them by less than bf16's spacing; measured 45% off here), whatever the time path does: bf16 training should
    use the exact JVP (LossConfig.time_derivative="exact")."""
    teacher = load_diffusers_teacher(wan_dir, dtype=torch.bfloat16).float()
    x, t, cond = wan_inputs(dtype=torch.float32)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    fn = lambda xx, tt: teacher(xx, tt, cond)  # noqa: E731
    f_exact, df_exact = student_time_derivative(fn, x, t, v, mode="exact", fd_step=1e-4)
    f_semi, df_semi = student_time_derivative(fn, x, t, v, mode="semi_continuous", fd_step=1e-4)
    torch.testing.assert_close(f_semi, f_exact)
    assert _rel(df_semi, df_exact) < 2e-2
    with torch.no_grad():
        _, df_spatial = torch.func.jvp(lambda xx: fn(xx, t), (x,), (v,))
    assert _rel(df_spatial, df_exact) > 0.05  # the time part is a real contribution


def _scm_grads(student: FlowModel, teacher: FlowModel, dtype=torch.float64):
    x, t, cond = wan_inputs(dtype=dtype)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
    neg = {"tokens": torch.zeros_like(cond["tokens"]), "mask": torch.zeros_like(cond["mask"])}
    teacher_fn = lambda xx, tt: guided_f(teacher, xx, tt, cond, neg, 5.0)  # noqa: E731
    student.zero_grad(set_to_none=True)
    loss, _ = scm_loss(student, teacher_fn, x, cond, t=t, eps=eps, r=0.5, config=LossConfig())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in student.named_parameters() if p.grad is not None}


def test_scm_gradients_with_the_fused_kernel_equal_the_math_path():
    """float32, head dim 32 (a size the kernel supports); on CPU the kernel source runs in Triton's interpreter."""
    model = build_wan_tiny(seed=3, attention_head_dim=32)
    nets = {
        b: FlowModel(WanNet.from_diffusers(copy.deepcopy(model), attention_backend=b), "rf") for b in ("math", "fused")
    }
    teacher = FlowModel(WanNet.from_diffusers(copy.deepcopy(model), attention_backend="math"), "rf")
    results = {b: _scm_grads(net, teacher, torch.float32) for b, net in nets.items()}
    (loss_m, grads_m), (loss_f, grads_f) = results["math"], results["fused"]
    assert grads_m.keys() == grads_f.keys() and len(grads_m) == len(list(nets["math"].parameters()))
    assert math.isclose(loss_f.item(), loss_m.item(), rel_tol=1e-4)
    for name, g in grads_m.items():
        if g.norm() > 0:
            assert _rel(grads_f[name], g) < 1e-3, name


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(policy):
    teacher = _float64_teacher(seed=4)
    plain = _float64_teacher(seed=4)
    checkpointed = _float64_teacher(seed=4)
    apply_activation_checkpointing(checkpointed.net, policy)
    loss_p, grads_p = _scm_grads(plain, teacher)
    loss_c, grads_c = _scm_grads(checkpointed, teacher)
    assert loss_c.item() == loss_p.item()
    assert grads_c.keys() == grads_p.keys()
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-12, atol=1e-14, msg=name)


# ----------------------------------------------------------------------------------------------- load errors


def test_load_refuses_a_directory_without_a_diffusers_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a diffusers transformer directory"):
        load_diffusers_teacher(tmp_path)


def test_load_refuses_an_unsupported_class_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ConfigError, match="'FluxTransformer2DModel' is not supported.*wan2.1"):
        load_diffusers_teacher(tmp_path)


@pytest.mark.parametrize("key", ["image_dim", "added_kv_proj_dim"])
def test_load_refuses_an_i2v_config_naming_the_key(tmp_path, key):
    path = save_wan_tiny(tmp_path / "transformer")
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] = 32
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"{key}=32.*image-to-video.*unsupported"):
        load_diffusers_teacher(path)


def test_from_diffusers_refuses_an_i2v_model():
    model = build_wan_tiny(image_dim=8, added_kv_proj_dim=8)
    with pytest.raises(ConfigError, match="image_dim=8, added_kv_proj_dim=8"):
        WanNet.from_diffusers(model)


def test_context_parallel_check_names_heads_and_tokens():
    net = _float64_teacher().net
    net.check_context_parallel(2, num_tokens=24)
    with pytest.raises(ValueError, match=r"num_heads \(2\) is not divisible by cp_degree \(4\)"):
        net.check_context_parallel(4)
    with pytest.raises(ValueError, match="the 9 tokens .* not divisible by cp_degree"):
        net.check_context_parallel(2, num_tokens=9)


def test_a_student_saves_back_in_diffusers_layout(tmp_path):
    """to_diffusers + save_pretrained writes the student's exact weights under diffusers' keys; loaded again through
    load_diffusers_teacher it gives the same F (up to diffusers rounding its keep-in-fp32 modules on load)."""
    from safetensors.torch import load_file

    student = _float64_teacher(seed=6)
    with torch.no_grad():  # a trained student differs from the teacher it started as
        for p in student.parameters():
            p.add_(0.01)
    path = tmp_path / "transformer"
    student.net.to_diffusers().save_pretrained(str(path))
    saved = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    expected = student.net.state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    loaded = load_diffusers_teacher(path, dtype=torch.float64)
    x, t, cond = wan_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), student(x, t, cond), rtol=1e-6, atol=1e-6)
