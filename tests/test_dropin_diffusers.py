"""fastguide.step against the real diffusers schedulers.

Each config runs a short CFG loop twice per step ("teacher forced"): the diffusers scheduler steps on
``u + w (c - u)``, and a deep copy of it (same state, cloned generator) steps through fastguide.step on the
raw 2B-row output. Per step we compare prev_sample / pred_original_sample, the scheduler state afterwards
and the generator state (so noise is drawn exactly when and as often as diffusers draws it). Free-running
loops, mid-loop switching, aliasing and bad input are tested separately.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler)

import fastguide  # noqa: E402
from fastguide import dropin  # noqa: E402
from fastguide.dropin.scheduler_step import scheduler_step  # noqa: E402
from fastguide.dropin import StepOutput, step  # noqa: E402

B, C, H, W = 2, 3, 8, 8
STEP_TOL = 1e-5     # relative to the largest magnitude of the reference, one step from identical inputs
LOOP_TOL = 1e-4     # whole free-running loops
# Every backend that can run on CPU here; "auto" is what the other tests use.
CPU_BACKENDS = [b for b in ("torch", "cpp") if fastguide.backends()[b]]


# ---------------------------------------------------------------------------------------------------
# A deterministic fake network and the diffusers-side CFG


def fake_model(x: torch.Tensor, t, learned: bool = False) -> torch.Tensor:
    """[uncond; cond] outputs for x ([B, C, H, W]) at timestep t; the halves differ so CFG matters."""
    t = float(t)
    chan = torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)
    base = 0.8 * torch.tanh(0.7 * x) + 0.2 * torch.sin(0.013 * t + chan)
    cond = base + 0.3 * torch.cos(1.3 * x + 0.002 * t) - 0.1 * chan
    if learned:
        var_u = torch.tanh(0.4 * x - 0.001 * t)
        var_c = torch.tanh(0.5 * x + 0.001 * t - 0.3)
        return torch.cat([torch.cat([base, var_u], 1), torch.cat([cond, var_c], 1)])
    return torch.cat([base, cond])


def per_sample(scale, like):
    if isinstance(scale, torch.Tensor):
        return scale.view(-1, *([1] * (like.dim() - 1)))
    return scale


def diffusers_cfg(mo: torch.Tensor, scale, rescale: float = 0.0, learned: bool = False) -> torch.Tensor:
    """What a diffusers pipeline feeds scheduler.step: CFG, rescale_noise_cfg (Lin et al. 2023)."""
    u, c = mo.chunk(2)
    var = None
    if learned:
        (u, _), (c, var) = u.chunk(2, dim=1), c.chunk(2, dim=1)
    g = u + per_sample(scale, u) * (c - u)
    if rescale:
        dims = list(range(1, g.dim()))
        ratio = c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True)
        g = rescale * (g * ratio) + (1 - rescale) * g
    return g if var is None else torch.cat([g, var], 1)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert torch.isfinite(got).all() and torch.isfinite(ref).all()
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def clone_gen(g):
    if g is None:
        return None
    twin = torch.Generator(device=g.device)
    twin.set_state(g.get_state())
    return twin


def state_of(s) -> dict:
    st = {"step_index": getattr(s, "_step_index", None), "begin_index": getattr(s, "_begin_index", None),
          "lower_order_nums": getattr(s, "lower_order_nums", None)}
    if hasattr(s, "model_outputs"):
        st["model_outputs"] = [None if m is None else m.clone() for m in s.model_outputs]
    return st


def assert_same_state(a: dict, b: dict, tol: float = STEP_TOL) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "model_outputs":
            assert len(a[k]) == len(b[k])
            for x, y in zip(a[k], b[k]):
                assert (x is None) == (y is None)
                if x is not None:
                    assert rel_err(x, y) <= tol
        else:
            assert a[k] == b[k], k


def initial_latents(scheduler, seed: int = 0) -> torch.Tensor:
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))
    return x * scheduler.init_noise_sigma


# ---------------------------------------------------------------------------------------------------
# Teacher-forced parity over many configs

CONFIGS = [
    # DDPM: every variance type, clip / threshold / none, spacings, zero-SNR
    ("ddpm-eps-clip-small", DDPMScheduler, dict(), dict(), 12),
    ("ddpm-v-large-trailing-zsnr", DDPMScheduler,
     dict(prediction_type="v_prediction", variance_type="fixed_large", clip_sample=False,
          rescale_betas_zero_snr=True, timestep_spacing="trailing"), dict(), 12),
    ("ddpm-sample-smalllog-threshold", DDPMScheduler,
     dict(prediction_type="sample", variance_type="fixed_small_log", thresholding=True,
          dynamic_thresholding_ratio=0.9, sample_max_value=1.5), dict(), 10),
    ("ddpm-eps-learned-range", DDPMScheduler,
     dict(variance_type="learned_range", clip_sample_range=2.0, beta_schedule="squaredcos_cap_v2"),
     dict(learned=True, rescale=0.5), 12),
    ("ddpm-eps-offset-noise-at-last", DDPMScheduler,
     dict(steps_offset=1, clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085,
          beta_end=0.012), dict(scale="tensor"), 10),
    ("ddpm-variance-none-is-fixed-small", DDPMScheduler, dict(variance_type=None), dict(), 6),
    ("ddpm-eps-linspace-rescale", DDPMScheduler, dict(timestep_spacing="linspace", clip_sample=False),
     dict(rescale=0.7), 10),
    # DDIM: eta, use_clipped_model_output, set_alpha_to_one, zero-SNR
    ("ddim-eps-clip", DDIMScheduler, dict(), dict(), 15),
    ("ddim-v-zsnr-trailing-eta", DDIMScheduler,
     dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
          clip_sample=False), dict(eta=0.5, rescale=0.5), 15),
    ("ddim-sample-threshold-clipped-eta1", DDIMScheduler,
     dict(prediction_type="sample", thresholding=True, sample_max_value=2.0),
     dict(eta=1.0, use_clipped_model_output=True, scale="tensor"), 12),
    ("ddim-eps-linspace-clipped-noalphaone", DDIMScheduler,
     dict(timestep_spacing="linspace", set_alpha_to_one=False, clip_sample_range=1.5),
     dict(use_clipped_model_output=True), 12),
    # Euler: predictions, Karras, churn, zero-SNR, log-linear sigmas, sigma_min final
    ("euler-eps", EulerDiscreteScheduler, dict(), dict(), 15),
    ("euler-v-karras", EulerDiscreteScheduler, dict(prediction_type="v_prediction", use_karras_sigmas=True),
     dict(scale="tensor"), 15),
    ("euler-sample-churn", EulerDiscreteScheduler, dict(prediction_type="sample"),
     dict(s_churn=0.8, s_tmin=0.5, s_tmax=30.0, s_noise=1.003), 15),
    ("euler-eps-churn-all", EulerDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1),
     dict(s_churn=5.0), 12),
    ("euler-v-zsnr-trailing-sigmamin", EulerDiscreteScheduler,
     dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
          final_sigmas_type="sigma_min"), dict(rescale=0.7), 12),
    ("euler-eps-loglinear", EulerDiscreteScheduler, dict(interpolation_type="log_linear"), dict(), 12),
    # Euler ancestral
    ("euler-a-eps", EulerAncestralDiscreteScheduler, dict(), dict(), 15),
    ("euler-a-v-zsnr-trailing", EulerAncestralDiscreteScheduler,
     dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
     dict(scale="tensor"), 12),
    # DPM-Solver++: orders, solver types, lower_order_final, euler_at_final, final sigma, thresholding
    ("dpm2-midpoint-lof", DPMSolverMultistepScheduler, dict(), dict(), 12),
    ("dpm2-heun-nolof-sigmamin-v", DPMSolverMultistepScheduler,
     dict(solver_type="heun", lower_order_final=False, final_sigmas_type="sigma_min",
          prediction_type="v_prediction"), dict(scale="tensor"), 12),
    ("dpm2-midpoint-lof-short-sigmamin", DPMSolverMultistepScheduler,
     dict(lower_order_final=True, final_sigmas_type="sigma_min"), dict(), 10),
    ("dpm2-midpoint-lof-long-sigmamin", DPMSolverMultistepScheduler,
     dict(lower_order_final=True, final_sigmas_type="sigma_min"), dict(), 16),
    ("dpm2-heun-karras-euler-at-final", DPMSolverMultistepScheduler,
     dict(solver_type="heun", use_karras_sigmas=True, euler_at_final=True, final_sigmas_type="sigma_min"),
     dict(rescale=0.3), 16),
    ("dpm1-sample-threshold", DPMSolverMultistepScheduler,
     dict(solver_order=1, prediction_type="sample", thresholding=True, sample_max_value=1.2), dict(), 10),
    ("dpm2-threshold-eps", DPMSolverMultistepScheduler,
     dict(thresholding=True, dynamic_thresholding_ratio=0.8), dict(), 10),
    ("dpm2-v-zsnr-trailing", DPMSolverMultistepScheduler,
     dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
     dict(), 12),
]


def _split_opts(opts: dict):
    """(fastguide/diffusers step kwargs, scale, rescale, learned) from a config's call options."""
    opts = dict(opts)
    learned = opts.pop("learned", False)
    rescale = opts.pop("rescale", 0.0)
    scale = torch.tensor([3.0, 6.5]) if opts.pop("scale", None) == "tensor" else 5.0
    return opts, scale, rescale, learned


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,cls,config,opts,steps", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_teacher_forced_parity(name, cls, config, opts, steps, backend):
    step_kwargs, scale, rescale, learned = _split_opts(opts)
    sched = cls(**config)
    sched.set_timesteps(steps)
    x = initial_latents(sched)
    gen = torch.Generator().manual_seed(1234)
    returns_x0 = cls is not DPMSolverMultistepScheduler
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        mo = fake_model(x_in, t, learned)
        twin, twin_gen = copy.deepcopy(sched), clone_gen(gen)
        ref = sched.step(diffusers_cfg(mo, scale, rescale, learned), t, x, generator=gen, **step_kwargs)
        got = step(mo, t, x, scheduler=twin, guidance_scale=scale, guidance_rescale=rescale,
                   generator=twin_gen, return_dict=True, backend=backend, **step_kwargs)
        assert type(got) is type(ref)    # the scheduler's own output class
        assert rel_err(got.prev_sample, ref.prev_sample) <= STEP_TOL, f"{name} t={t}"
        if returns_x0:
            assert rel_err(got.pred_original_sample, ref.pred_original_sample) <= STEP_TOL, f"{name} t={t}"
        else:   # DPM-Solver returns no x0: the one it keeps for its next step
            assert rel_err(twin.model_outputs[-1], sched.model_outputs[-1]) <= STEP_TOL
        assert_same_state(state_of(twin), state_of(sched))
        assert torch.equal(twin_gen.get_state(), gen.get_state()), "noise drawn differently from diffusers"
        x = ref.prev_sample


def test_ddpm_custom_timesteps_and_no_set_timesteps(monkeypatch):
    # Unit-stride steps at small t: diffusers' float32 ``1 - abar_t / abar_prev`` loses ~1e-4 of beta_t to
    # cancellation, while the rows are built in float64. So the tight check is against diffusers run in
    # float64 (same noise: drawn in float32, then cast), and diffusers' own float32 result within 1e-4.
    from diffusers.schedulers import scheduling_ddpm

    def randn_f32(shape, generator=None, device=None, dtype=None):
        return torch.randn(shape, generator=generator, device=device).to(dtype)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", randn_f32)
    for custom in ([900, 700, 420, 101, 37, 5, 0], None):
        sched = DDPMScheduler(clip_sample=False)
        if custom is not None:
            sched.set_timesteps(timesteps=custom)
        sched64 = copy.deepcopy(sched)
        sched64.alphas_cumprod, sched64.one = sched64.alphas_cumprod.double(), sched64.one.double()
        x = initial_latents(sched)
        gen = torch.Generator().manual_seed(7)
        ts = sched.timesteps if custom is not None else sched.timesteps[-6:]  # tail of the 1000-step chain
        for t in ts:
            mo = fake_model(x, t)
            gen32, gen64 = clone_gen(gen), clone_gen(gen)
            ref = sched.step(diffusers_cfg(mo, 2.0), t, x, generator=gen32).prev_sample
            ref64 = sched64.step(diffusers_cfg(mo.double(), 2.0), t, x.double(), generator=gen64).prev_sample
            got = step(mo, t, x, scheduler=sched, guidance_scale=2.0, generator=gen)
            assert rel_err(got, ref64.float()) <= STEP_TOL
            assert rel_err(got, ref) <= LOOP_TOL
            x = ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make", [lambda: DDIMScheduler(thresholding=True, sample_max_value=1.5),
                                  lambda: EulerDiscreteScheduler(), lambda: DPMSolverMultistepScheduler()],
                         ids=["ddim-threshold", "euler", "dpm2"])
def test_half_precision_inputs(make, dtype):
    # fastguide computes in fp32 and stores in the input dtype; diffusers computes (partly) in the input
    # dtype, so the two agree to half precision.
    sched = make()
    sched.set_timesteps(6)
    x = initial_latents(sched).to(dtype)
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        mo = fake_model(x_in.float(), t).to(dtype)
        twin = copy.deepcopy(sched)
        ref = sched.step(diffusers_cfg(mo, 3.0), t, x).prev_sample
        got = step(mo, t, x, scheduler=twin, guidance_scale=3.0)
        assert got.dtype == ref.dtype == dtype
        assert rel_err(got, ref) <= 2e-2
        x = ref


# ---------------------------------------------------------------------------------------------------
# Free-running loops, switching, plain steps, aliasing


def run_loop(make, steps, mode, *, scale=4.0, seed=99, step_kwargs=None, learned=False):
    """A whole loop; ``mode(i)`` says whether step i uses fastguide.step (True) or scheduler.step."""
    step_kwargs = step_kwargs or {}
    sched = make()
    sched.set_timesteps(steps)
    x = initial_latents(sched, seed=3)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        mo = fake_model(x_in, t, learned)
        if mode(i):
            x = step(mo, t, x, scheduler=sched, guidance_scale=scale, generator=gen, **step_kwargs)
        else:
            x = sched.step(diffusers_cfg(mo, scale, learned=learned), t, x, generator=gen, **step_kwargs).prev_sample
    return x, sched


LOOPS = [
    ("ddpm", lambda: DDPMScheduler(), {}, 25),
    ("ddpm-learned", lambda: DDPMScheduler(variance_type="learned_range"), {"learned": True}, 20),
    ("ddim-eta", lambda: DDIMScheduler(), {"step_kwargs": {"eta": 0.7}}, 20),
    ("euler-churn", lambda: EulerDiscreteScheduler(), {"step_kwargs": {"s_churn": 2.0, "s_tmax": 50.0}}, 20),
    ("euler-a", lambda: EulerAncestralDiscreteScheduler(), {}, 20),
    ("dpm2-karras", lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True), {}, 25),
]


@pytest.mark.parametrize("name,make,kw,steps", LOOPS, ids=[c[0] for c in LOOPS])
def test_whole_loop_and_switching(name, make, kw, steps):
    ref, ref_sched = run_loop(make, steps, lambda i: False, **kw)
    got, got_sched = run_loop(make, steps, lambda i: True, **kw)
    assert rel_err(got, ref) <= LOOP_TOL
    mixed, mixed_sched = run_loop(make, steps, lambda i: i % 3 == 1, **kw)
    assert rel_err(mixed, ref) <= LOOP_TOL
    for s in (got_sched, mixed_sched):
        assert_same_state(state_of(s), state_of(ref_sched), tol=LOOP_TOL)


@pytest.mark.parametrize("make,learned", [
    (lambda: DDIMScheduler(), False), (lambda: DPMSolverMultistepScheduler(), False),
    (lambda: EulerDiscreteScheduler(), False), (lambda: DDPMScheduler(variance_type="learned_range"), True)],
    ids=["ddim", "dpm2", "euler", "ddpm-learned-range"])
def test_plain_b_row_steps(make, learned):
    ref_sched, sched = make(), make()
    ref_sched.set_timesteps(8)
    sched.set_timesteps(8)
    gen, ref_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    x_ref = x = initial_latents(sched)
    for t in sched.timesteps:
        mo = fake_model(sched.scale_model_input(x, t), t, learned)[B:]
        mo_ref = fake_model(ref_sched.scale_model_input(x_ref, t), t, learned)[B:]
        x_ref = ref_sched.step(mo_ref, t, x_ref, generator=ref_gen).prev_sample
        x = step(mo, t, x, scheduler=sched, generator=gen)
        assert rel_err(x, x_ref) <= LOOP_TOL


def test_out_aliases_sample_and_return_types():
    sched, ref_sched = DPMSolverMultistepScheduler(), DPMSolverMultistepScheduler()
    sched.set_timesteps(6)
    ref_sched.set_timesteps(6)
    x = initial_latents(sched)
    x_ref = x.clone()
    for t in sched.timesteps:
        mo = fake_model(x, t)
        ref = ref_sched.step(diffusers_cfg(mo, 3.0), t, x_ref).prev_sample
        res = step(mo, t, x, scheduler=sched, guidance_scale=3.0, out=x)
        assert res is x
        assert rel_err(x, ref) <= LOOP_TOL
        # the stored x0 must be its own tensor, not the buffer that is overwritten next step
        assert sched.model_outputs[-1].data_ptr() != x.data_ptr()
        x_ref = ref
    sched = DDIMScheduler()
    sched.set_timesteps(5)
    x = initial_latents(sched)
    t = sched.timesteps[0]
    assert isinstance(step(fake_model(x, t), int(t), x, scheduler=sched, guidance_scale=2.0), torch.Tensor)
    res = step(fake_model(x, t), t, x, scheduler=sched, guidance_scale=2.0, return_dict=True)
    ref = sched.step(diffusers_cfg(fake_model(x, t), 2.0), t, x)
    assert rel_err(res.prev_sample, ref.prev_sample) <= STEP_TOL
    assert rel_err(res.pred_original_sample, ref.pred_original_sample) <= STEP_TOL


def test_generator_list_per_sample():
    sched, ref_sched = EulerAncestralDiscreteScheduler(), EulerAncestralDiscreteScheduler()
    for s in (sched, ref_sched):
        s.set_timesteps(6)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    ref_gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    x = x_ref = initial_latents(sched)
    for t in sched.timesteps:
        mo = fake_model(sched.scale_model_input(x, t), t)
        mo_ref = fake_model(ref_sched.scale_model_input(x_ref, t), t)
        x_ref = ref_sched.step(diffusers_cfg(mo_ref, 2.5), t, x_ref, generator=ref_gens).prev_sample
        x = step(mo, t, x, scheduler=sched, guidance_scale=2.5, generator=gens)
    assert rel_err(x, x_ref) <= LOOP_TOL


def test_global_rng_when_no_generator():
    # generator=None: both draw from torch's global RNG, so reseeding it gives the same loop.
    results = []
    for use_fastguide in (False, True):
        torch.manual_seed(123)
        x, _ = run_loop(lambda: DDPMScheduler(), 8, lambda i: use_fastguide, seed=None)
        results.append(x)
    assert rel_err(results[1], results[0]) <= LOOP_TOL


def test_new_set_timesteps_rebuilds_the_table():
    sched, ref_sched = DDIMScheduler(), DDIMScheduler()
    for n in (10, 4, 10):
        sched.set_timesteps(n)
        ref_sched.set_timesteps(n)
        x = initial_latents(sched)
        for t in sched.timesteps[:2]:
            mo = fake_model(x, t)
            ref = ref_sched.step(diffusers_cfg(mo, 2.0), t, x).prev_sample
            got = step(mo, t, x, scheduler=sched, guidance_scale=2.0)
            assert rel_err(got, ref) <= STEP_TOL
    plan = dropin.plan_for(sched)
    assert plan.num_steps == 10 and plan.table(torch.device("cpu")).shape == (10, plan.rows.shape[1])


def test_begin_index_initialises_like_diffusers():
    # img2img: the pipeline sets begin_index and starts mid-schedule
    sched, ref_sched = DPMSolverMultistepScheduler(), DPMSolverMultistepScheduler()
    for s in (sched, ref_sched):
        s.set_timesteps(10)
        s.set_begin_index(4)
    x = initial_latents(sched)
    for t in sched.timesteps[4:]:
        mo = fake_model(x, t)
        ref = ref_sched.step(diffusers_cfg(mo, 3.0), t, x).prev_sample
        got = step(mo, t, x, scheduler=sched, guidance_scale=3.0)
        assert rel_err(got, ref) <= STEP_TOL
        assert sched.step_index == ref_sched.step_index
        x = ref


# ---------------------------------------------------------------------------------------------------
# Guidance hooks (score correction and DDPM mean shift) used by classifier / discriminator guidance


def guided_hook_step(mo, t, x, sched, generator=None, **hooks):
    return scheduler_step(mo, t, x, scheduler=sched, guidance_scale=2.0, generator=generator, want_x0=True,
                          **hooks)


GRAD = 0.05 * torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("make", [lambda: DDIMScheduler(clip_sample=False), lambda: EulerDiscreteScheduler(),
                                  lambda: DPMSolverMultistepScheduler(), lambda: DDPMScheduler(clip_sample=False)],
                         ids=["ddim", "euler", "dpm2", "ddpm"])
def test_score_correction_hook(make):
    # Without clipping, eps -= sigma g (sigma of the state x = alpha x0 + sigma eps, recorded in the plan)
    # is the same as stepping the scheduler on the corrected eps-prediction.
    sched = make()
    sched.set_timesteps(10)
    x = initial_latents(sched)
    for i, t in enumerate(sched.timesteps):
        mo = fake_model(sched.scale_model_input(x, t), t)
        sigma = float(dropin.plan_for(sched).sigma[i])
        twin, gen = copy.deepcopy(sched), torch.Generator().manual_seed(i)
        ref = sched.step(diffusers_cfg(mo, 2.0) - sigma * GRAD, t, x, generator=clone_gen(gen))
        got, x0 = guided_hook_step(mo, t, x, twin, generator=gen, g_score=GRAD)
        assert rel_err(got, ref.prev_sample) <= STEP_TOL
        if hasattr(ref, "pred_original_sample"):
            assert rel_err(x0, ref.pred_original_sample) <= STEP_TOL
        x = ref.prev_sample
    if isinstance(sched, DDIMScheduler):
        t = sched.timesteps[3]
        assert dropin.plan_for(sched).sigma[3] == pytest.approx((1 - sched.alphas_cumprod[t]).sqrt().item())


@pytest.mark.parametrize("vtype", ["fixed_small", "fixed_large", "learned_range"])
def test_mean_shift_hook(vtype):
    # DDPM mean shift mu += Sigma g (ADM / Ma et al.): the same noise, the step's variance Sigma.
    learned = vtype == "learned_range"
    sched = DDPMScheduler(variance_type=vtype)
    sched.set_timesteps(8)
    plan = dropin.plan_for(sched)
    x = initial_latents(sched)
    gen = torch.Generator().manual_seed(2)
    for i, t in enumerate(sched.timesteps):
        mo = fake_model(x, t, learned)
        guided = diffusers_cfg(mo, 2.0, learned=learned)
        if learned:
            log_var = sched._get_variance(int(t), predicted_variance=guided[:, C:])
            variance = log_var.exp()
        else:
            variance = float(plan.variance[i])
        twin = clone_gen(gen)
        ref = sched.step(guided, t, x, generator=gen).prev_sample + variance * GRAD
        got, _ = guided_hook_step(mo, t, x, sched, generator=twin, g_mean=GRAD)
        assert rel_err(got, ref.float()) <= STEP_TOL
        x = ref.float()


# ---------------------------------------------------------------------------------------------------
# Bad input: the right error naming the argument, and nothing changed


def _dpm_mid_loop():
    sched = DPMSolverMultistepScheduler()
    sched.set_timesteps(8)
    x = initial_latents(sched)
    for t in sched.timesteps[:2]:
        x = step(fake_model(x, t), t, x, scheduler=sched, guidance_scale=2.0)
    return sched, x


def _ddim():
    sched = DDIMScheduler()
    sched.set_timesteps(8)
    return sched, initial_latents(sched)


def _euler():
    sched = EulerDiscreteScheduler()
    sched.set_timesteps(8)
    return sched, initial_latents(sched)


def _make(cls, steps=8, **config):
    def build():
        sched = cls(**config)
        sched.set_timesteps(steps)
        return sched, initial_latents(sched)
    return build


def _with(setup, fn):
    def build():
        sched, x = setup()
        fn(sched)
        return sched, x
    return build


BAD = [
    # (id, scheduler setup, call overrides, error type, name the message must contain)
    ("b-rows-with-scale", _dpm_mid_loop, dict(mo=lambda x, t: fake_model(x, t)[:B]), ValueError, "model_output"),
    ("2b-rows-no-scale", _dpm_mid_loop, dict(guidance_scale=None), ValueError, "model_output"),
    ("per-sample-shape", _ddim, dict(mo=lambda x, t: fake_model(x, t)[..., :4]), ValueError, "model_output"),
    ("dtype-mismatch", _dpm_mid_loop, dict(mo=lambda x, t: fake_model(x, t).double()), TypeError, "model_output"),
    ("device-mismatch", _ddim, dict(mo=lambda x, t: torch.empty(2 * B, C, H, W, device="meta")), ValueError,
     "model_output"),
    ("sample-not-tensor", _ddim, dict(x=lambda x: x.tolist()), TypeError, "sample"),
    ("negative-scale", _dpm_mid_loop, dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
    ("nan-scale", _ddim, dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    ("inf-scale-tensor", _euler, dict(guidance_scale=torch.tensor([1.0, float("inf")])), ValueError,
     "guidance_scale"),
    ("scale-wrong-length", _dpm_mid_loop, dict(guidance_scale=torch.ones(B + 1)), ValueError, "guidance_scale"),
    ("scale-not-number", _ddim, dict(guidance_scale="7"), TypeError, "guidance_scale"),
    ("rescale-out-of-range", _dpm_mid_loop, dict(guidance_rescale=1.5), ValueError, "guidance_rescale"),
    ("rescale-without-scale", _ddim, dict(guidance_scale=None, mo=lambda x, t: fake_model(x, t)[B:],
                                          guidance_rescale=0.5), ValueError, "guidance_rescale"),
    # DDIMScheduler.step takes any training timestep (tests/test_dropin_contract.py); outside [0, T) it fails.
    ("timestep-not-in-schedule", _ddim, dict(t=lambda s: 1000), ValueError, "timestep"),
    ("timestep-fractional-ddim", _ddim, dict(t=lambda s: 2.5), ValueError, "timestep"),
    ("timestep-not-in-schedule-ddpm", _make(DDPMScheduler), dict(t=lambda s: torch.tensor(999)), ValueError,
     "timestep"),
    ("timestep-not-in-schedule-dpm", _make(DPMSolverMultistepScheduler), dict(t=lambda s: 3), ValueError,
     "timestep"),
    ("timestep-integer-index-euler", _euler, dict(t=lambda s: 0), ValueError, "timestep"),
    ("timestep-not-scalar", _ddim, dict(t=lambda s: s.timesteps[:2]), ValueError, "timestep"),
    ("past-the-end", _with(_dpm_mid_loop, lambda s: setattr(s, "_step_index", len(s.timesteps))), {},
     ValueError, "scheduler"),
    ("ddim-without-set-timesteps", lambda: (DDIMScheduler(), torch.randn(B, C, H, W)), dict(t=lambda s: 999),
     ValueError, "set_timesteps"),
    ("unsupported-scheduler", lambda: (diffusers.HeunDiscreteScheduler(), torch.randn(B, C, H, W)),
     dict(t=lambda s: 999.0), ValueError, "scheduler"),
    ("ddim-inverse-overrides-step", _make(diffusers.DDIMInverseScheduler), {}, ValueError, "scheduler"),
    ("dpm-sde-non-plus-plus", _make(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver",
                                     final_sigmas_type="sigma_min"), {}, ValueError,
     "algorithm_type"),
    ("dpm-order-4", _make(DPMSolverMultistepScheduler, solver_order=4), {}, ValueError, "solver_order"),
    ("dpm-learned-variance", _make(DPMSolverMultistepScheduler, variance_type="learned_range"), {}, ValueError,
     "variance_type"),
    ("dpm-flow-prediction", _make(DPMSolverMultistepScheduler, use_flow_sigmas=True,
                                  prediction_type="flow_prediction"), {}, ValueError, "prediction_type"),
    ("dpm-flow-sigmas", _make(DPMSolverMultistepScheduler, use_flow_sigmas=True), {}, ValueError,
     "use_flow_sigmas"),
    ("ddpm-learned", _make(DDPMScheduler, variance_type="learned"), {}, ValueError, "variance_type"),
    ("ddpm-fixed-large-log", _make(DDPMScheduler, variance_type="fixed_large_log"), {}, ValueError,
     "variance_type"),
    ("ddpm-learned-range-needs-2c", _make(DDPMScheduler, variance_type="learned_range"), {}, ValueError,
     "model_output"),
    ("euler-a-sample", _make(EulerAncestralDiscreteScheduler, prediction_type="sample"), {}, ValueError,
     "prediction_type"),
    ("eta-on-euler", _euler, dict(eta=0.5), ValueError, "eta"),
    ("negative-eta", _ddim, dict(eta=-0.1), ValueError, "eta"),
    ("clipped-on-dpm", _dpm_mid_loop, dict(use_clipped_model_output=True), ValueError,
     "use_clipped_model_output"),
    ("churn-on-ddim", _ddim, dict(s_churn=1.0), ValueError, "s_churn"),
    ("nan-churn", _euler, dict(s_churn=float("nan")), ValueError, "s_churn"),
    ("out-shape", _dpm_mid_loop, dict(out=lambda x: torch.full((B, C, H, W + 1), 3.0)), ValueError, "out"),
    ("out-dtype", _ddim, dict(out=lambda x: torch.full((B, C, H, W), 3.0, dtype=torch.float64)), TypeError, "out"),
    ("generator-type", _make(EulerAncestralDiscreteScheduler), dict(generator=lambda: 42), TypeError,
     "generator"),
    ("generator-list-length", _make(EulerAncestralDiscreteScheduler),
     dict(generator=lambda: [torch.Generator()] * 3), ValueError, "generator"),
    ("backend", _ddim, dict(backend="nope"), ValueError, "backend"),
]


@pytest.mark.parametrize("case,setup,over,exc,name", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_changes_nothing(case, setup, over, exc, name):
    sched, x = setup()
    t = over["t"](sched) if "t" in over else (
        sched.timesteps[sched.step_index] if getattr(sched, "step_index", None) is not None and
        sched.step_index < len(sched.timesteps) else sched.timesteps[0])
    x = over["x"](x) if "x" in over else x
    t_model = t if not isinstance(t, torch.Tensor) or t.numel() == 1 else t[0]
    mo = over["mo"](x, t_model) if "mo" in over else fake_model(x if isinstance(x, torch.Tensor) else
                                                                torch.zeros(B, C, H, W), t_model)
    gen = over["generator"]() if "generator" in over else torch.Generator().manual_seed(0)
    out = over["out"](x) if "out" in over else torch.full((B, C, H, W), 7.0)
    kwargs = {k: v for k, v in over.items() if k not in ("t", "x", "mo", "generator", "out")}
    kwargs.setdefault("guidance_scale", 2.0)
    before = state_of(sched)
    x_before = x.clone() if isinstance(x, torch.Tensor) else None
    mo_before = mo.clone() if mo.device.type != "meta" else None
    out_before = out.clone()
    gen_before = gen.get_state() if isinstance(gen, torch.Generator) else None
    with pytest.raises(exc) as info:
        step(mo, t, x, scheduler=sched, generator=gen, out=out, **kwargs)
    assert name in str(info.value), str(info.value)
    assert_same_state(state_of(sched), before, tol=0.0)
    if x_before is not None:
        assert torch.equal(x, x_before)
    if mo_before is not None:
        assert torch.equal(mo, mo_before)
    assert torch.equal(out, out_before)
    if gen_before is not None:
        assert torch.equal(gen.get_state(), gen_before)


def test_g_mean_rejected_where_undefined():
    sched, x = _ddim()
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="g_mean"):
        scheduler_step(fake_model(x, t), t, x, scheduler=sched, guidance_scale=2.0, g_mean=torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------------
# Guidance networks returning the wrong shape: named, with the expected shape, before anything changes


def _clf_flat_sum(x, t):          # [B], not [B, K]
    return x.reshape(x.shape[0], -1).sum(1)


def _clf_wrong_batch(x, t):       # [B - 1, K]
    return x.reshape(x.shape[0], -1)[1:, :5]


def _disc_2d(x, t, y=None):       # [B, 2], not [B]
    return x.reshape(x.shape[0], -1)[:, :2]


def _disc_wrong_batch(x, t, y=None):  # [B + 1]
    return torch.cat([x.reshape(x.shape[0], -1).sum(1), torch.zeros(1)])


BAD_GUIDANCE = [
    ("clf-1d", lambda: fastguide.ClassifierGuidance(_clf_flat_sum), "classifier", f"[{B}, K]"),
    ("clf-batch", lambda: fastguide.ClassifierGuidance(_clf_wrong_batch, scale=2.0), "classifier", f"[{B}, K]"),
    ("disc-2d", lambda: fastguide.DiscriminatorGuidance(_disc_2d), "discriminator", f"[{B}]"),
    ("disc-batch", lambda: fastguide.DiscriminatorGuidance(_disc_wrong_batch, weight=2.0), "discriminator",
     f"[{B}]"),
]
GUIDED_SETUPS = [("euler-a", _make(EulerAncestralDiscreteScheduler)),  # draws noise on every step
                 ("ddpm", _make(DDPMScheduler)),                        # mean shift, draws noise
                 ("ddim-eta", _ddim),
                 ("dpm-mid-loop", _dpm_mid_loop)]                      # keeps model_outputs


@pytest.mark.parametrize("setup_id,setup", GUIDED_SETUPS, ids=[s[0] for s in GUIDED_SETUPS])
@pytest.mark.parametrize("case,make_spec,network,shape", BAD_GUIDANCE, ids=[b[0] for b in BAD_GUIDANCE])
def test_guidance_network_wrong_shape_changes_nothing(setup_id, setup, case, make_spec, network, shape):
    sched, x = setup()
    t = sched.timesteps[sched.step_index] if getattr(sched, "step_index", None) is not None else sched.timesteps[0]
    x_in = sched.scale_model_input(x, t)
    mo = fake_model(x_in, t)
    gen = torch.Generator().manual_seed(5)
    out = torch.full((B, C, H, W), 7.0)
    before, gen_before = state_of(sched), gen.get_state()
    step_index = getattr(sched, "step_index", None)
    x_before, mo_before = x.clone(), mo.clone()
    kw = dict(eta=1.0) if setup_id == "ddim-eta" else {}
    with pytest.raises(ValueError) as info:
        step(mo, t, x, scheduler=sched, guidance_scale=2.0, guidance=[make_spec()], y=torch.tensor([1, 3]),
             generator=gen, out=out, **kw)
    msg = str(info.value)
    assert network in msg and shape in msg, msg
    assert getattr(sched, "step_index", None) == step_index
    assert_same_state(state_of(sched), before, tol=0.0)
    assert torch.equal(gen.get_state(), gen_before), "the generator was drawn from before the error"
    assert torch.equal(out, torch.full((B, C, H, W), 7.0)), "out was written before the error"
    assert torch.equal(x, x_before) and torch.equal(mo, mo_before)
    # and the scheduler still steps normally afterwards, like diffusers from the same state
    twin, twin_gen = copy.deepcopy(sched), clone_gen(gen)
    ref = twin.step(diffusers_cfg(mo, 2.0), t, x, generator=twin_gen, **kw).prev_sample
    got = step(mo, t, x, scheduler=sched, guidance_scale=2.0, generator=gen, **kw)
    assert rel_err(got, ref) <= STEP_TOL
    assert torch.equal(gen.get_state(), twin_gen.get_state())


def test_guidance_network_that_raises_changes_nothing():
    sched, x = _make(EulerAncestralDiscreteScheduler)()
    t = sched.timesteps[0]
    mo = fake_model(sched.scale_model_input(x, t), t)
    gen, out = torch.Generator().manual_seed(5), torch.full((B, C, H, W), 7.0)
    before, gen_before = state_of(sched), gen.get_state()

    def broken(x, t):
        raise RuntimeError("classifier exploded")
    with pytest.raises(RuntimeError, match="exploded"):
        step(mo, t, x, scheduler=sched, guidance_scale=2.0, guidance=[fastguide.ClassifierGuidance(broken)],
             y=torch.tensor([0, 1]), generator=gen, out=out)
    assert_same_state(state_of(sched), before, tol=0.0)
    assert torch.equal(gen.get_state(), gen_before) and torch.equal(out, torch.full((B, C, H, W), 7.0))


# ---------------------------------------------------------------------------------------------------
# prepare(scheduler, device): an unusable device is a ValueError naming it, before anything is built


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_prepare_on_cuda_without_cuda_names_device(device):
    from fastguide.dropin.schedulers import STATE_ATTR
    sched = EulerDiscreteScheduler()
    sched.set_timesteps(6)
    with pytest.raises(ValueError, match="device") as info:
        dropin.prepare(sched, device)
    assert "cuda" in str(info.value) and "Torch not compiled" not in str(info.value)
    assert getattr(sched, STATE_ATTR, None) is None, "prepare built state before reporting the device"


@pytest.mark.parametrize("device,exc", [("gpu", ValueError), ("cuda:x", ValueError), ("", ValueError),
                                        (1.5, TypeError), (True, TypeError), ([0], TypeError)])
def test_prepare_with_an_invalid_device_names_device(device, exc):
    sched = DDIMScheduler()
    sched.set_timesteps(6)
    with pytest.raises(exc, match="device"):
        dropin.prepare(sched, device)


def test_prepare_on_a_cuda_index_that_does_not_exist():
    sched = DDIMScheduler()
    sched.set_timesteps(6)
    with pytest.raises(ValueError, match="device"):
        dropin.prepare(sched, f"cuda:{torch.cuda.device_count() + 3}")


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu"), "cpu:0"])
def test_prepare_on_a_usable_device(device):
    sched = EulerDiscreteScheduler()
    sched.set_timesteps(6)
    plan = dropin.prepare(sched, device)
    assert plan.num_steps == 6


# ---------------------------------------------------------------------------------------------------
# diffusers' warning when scale_model_input was never called (Euler, Euler ancestral)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def diffusers_logs():
    """The records diffusers' loggers emit (its library root logger does not propagate to the root)."""
    logger, handler = logging.getLogger("diffusers"), _Records()
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def _summary(records):
    return [(r.name, r.levelno, r.getMessage()) for r in records]


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
def test_warns_like_diffusers_when_scale_model_input_was_never_called(cls):
    ref_sched, sched = cls(), cls()
    for s in (ref_sched, sched):
        s.set_timesteps(4)
    x = initial_latents(sched)
    for t in sched.timesteps[:2]:
        mo = fake_model(x, t)
        with diffusers_logs() as theirs:
            ref = ref_sched.step(diffusers_cfg(mo, 2.0), t, x, generator=torch.Generator().manual_seed(0))
        with diffusers_logs() as ours:
            got = step(mo, t, x, scheduler=sched, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        assert len(theirs) == 1 and "scale_model_input" in theirs[0].getMessage()
        assert _summary(ours) == _summary(theirs)    # same logger, level (WARNING) and text, once per call
        assert rel_err(got, ref.prev_sample) <= STEP_TOL
        x = ref.prev_sample
    # once scale_model_input has been called, neither warns
    t = sched.timesteps[2]
    for s in (ref_sched, sched):
        s.scale_model_input(x, t)
    mo = fake_model(x, t)
    with diffusers_logs() as theirs:
        ref_sched.step(diffusers_cfg(mo, 2.0), t, x)
    with diffusers_logs() as ours:
        step(mo, t, x, scheduler=sched, guidance_scale=2.0)
    assert theirs == [] and ours == []


def test_scale_model_input_warning_follows_diffusers_verbosity_and_scheduler_kind():
    from diffusers.utils import logging as diffusers_logging
    sched = EulerDiscreteScheduler()
    sched.set_timesteps(4)
    x, t = initial_latents(sched), sched.timesteps[0]
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with diffusers_logs() as ours:
            step(fake_model(x, t), t, x, scheduler=sched, guidance_scale=2.0)
    finally:
        diffusers_logging.set_verbosity(level)
    assert ours == []
    # schedulers whose step() has no such warning (no is_scale_input_called) get none from fastguide.step
    for make in (_ddim, _make(DDPMScheduler), _make(DPMSolverMultistepScheduler)):
        sched, x = make()
        t = sched.timesteps[0]
        with diffusers_logs() as ours:
            step(fake_model(x, t), t, x, scheduler=sched, guidance_scale=2.0)
        assert ours == []
