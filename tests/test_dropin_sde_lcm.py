"""fastguide.step against diffusers' DPM++ 2M SDE (``DPMSolverMultistepScheduler(algorithm_type=
"sde-dpmsolver++")``) and ``LCMScheduler``.

As in tests/test_dropin_diffusers.py: teacher-forced steps (the diffusers scheduler steps on ``u + w (c - u)``,
a deep copy of it with a cloned generator steps through fastguide.step on the raw 2B-row output; per step we
compare the outputs, the scheduler's state and the generator's state), then free-running loops that switch
between ``scheduler.step`` and ``fastguide.step``, the return_dict forms, and rejected options.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, LCMScheduler  # noqa: E402

import fastguide  # noqa: E402
from fastguide import dropin  # noqa: E402
from fastguide.dropin import step  # noqa: E402
from fastguide.dropin.scheduler_step import scheduler_step  # noqa: E402

from test_dropin_diffusers import clone_gen, diffusers_cfg, rel_err  # noqa: E402  (the shared CFG reference)

B, C, H, W = 2, 3, 8, 8
STEP_TOL = 1e-5     # relative to the largest magnitude of the reference, one step from identical inputs
LOOP_TOL = 1e-4     # whole free-running loops
CPU_BACKENDS = [b for b in ("torch", "cpp") if fastguide.backends()[b]]


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """[uncond; cond] outputs for x at timestep t; the halves differ so CFG matters."""
    t = float(t)
    chan = torch.arange(x.shape[1], dtype=x.dtype).view(1, -1, 1, 1)
    base = 0.8 * torch.tanh(0.7 * x) + 0.2 * torch.sin(0.013 * t + chan)
    cond = base + 0.3 * torch.cos(1.3 * x + 0.002 * t) - 0.1 * chan
    return torch.cat([base, cond])


def state_of(s) -> dict:
    st = {"step_index": s._step_index, "begin_index": s._begin_index,
          "lower_order_nums": getattr(s, "lower_order_nums", None)}
    if hasattr(s, "model_outputs"):
        st["model_outputs"] = [None if m is None else m.clone() for m in s.model_outputs]
    return st


def assert_same_state(a: dict, b: dict, tol: float) -> None:
    """Equal scheduler states: tensors (alone or in lists, None where the other has None too) to ``tol``."""
    assert a.keys() == b.keys()
    for k in a:
        xs, ys = (a[k], b[k]) if isinstance(a[k], list) and k == "model_outputs" else ([a[k]], [b[k]])
        if not any(isinstance(v, torch.Tensor) for v in xs + ys):
            assert a[k] == b[k], k
            continue
        assert [v is None for v in xs] == [v is None for v in ys], k
        for x, y in zip(xs, ys):
            if x is not None:
                assert rel_err(x, y) <= tol, k


def latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))  # init_noise_sigma is 1


def SDE(**config):
    return lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **config)


def LCM(**config):
    return lambda: LCMScheduler(**config)


PER_SAMPLE = torch.tensor([3.0, 6.5])

# (id, scheduler factory, set_timesteps kwargs, guidance_scale, guidance_rescale)
CONFIGS = [
    # DPM++ SDE: order 1 and 2, midpoint / heun, Karras sigmas, lower-order final rules, final sigma, predictions.
    # (Karras sigmas with final_sigmas_type="sigma_min" repeat the last sigma: a second-order last step has h = 0
    # and is NaN in diffusers itself, so those configs end with a first-order step: < 15 steps or euler_at_final.)
    ("sde1-eps", SDE(solver_order=1), dict(num_inference_steps=12), 5.0, 0.0),
    ("sde2-midpoint-eps-rescale", SDE(), dict(num_inference_steps=12), 5.0, 0.7),
    ("sde2-midpoint-karras", SDE(use_karras_sigmas=True), dict(num_inference_steps=20), PER_SAMPLE, 0.0),
    ("sde2-heun-karras-v-sigmamin", SDE(solver_type="heun", use_karras_sigmas=True, prediction_type="v_prediction",
                                        final_sigmas_type="sigma_min"), dict(num_inference_steps=14), 4.0, 0.0),
    ("sde2-heun-nolof-sigmamin", SDE(solver_type="heun", lower_order_final=False, final_sigmas_type="sigma_min"),
     dict(num_inference_steps=10), PER_SAMPLE, 0.3),
    ("sde2-lof-short-sigmamin", SDE(final_sigmas_type="sigma_min"), dict(num_inference_steps=10), 5.0, 0.0),
    ("sde2-lof-long-sigmamin", SDE(final_sigmas_type="sigma_min"), dict(num_inference_steps=16), 5.0, 0.0),
    ("sde2-euler-at-final", SDE(euler_at_final=True, final_sigmas_type="sigma_min", use_karras_sigmas=True),
     dict(num_inference_steps=16), 5.0, 0.0),
    ("sde2-sample-threshold", SDE(prediction_type="sample", thresholding=True, sample_max_value=1.2),
     dict(num_inference_steps=10), 5.0, 0.0),
    ("sde1-v-zsnr-trailing-karras", SDE(solver_order=1, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                        timestep_spacing="trailing", use_karras_sigmas=True),
     dict(num_inference_steps=12), PER_SAMPLE, 0.5),
    # LCM: predictions, clip / threshold, timestep_scaling, zero-SNR, original steps, strength, custom timesteps
    ("lcm-eps", LCM(), dict(num_inference_steps=10), 5.0, 0.0),
    ("lcm-eps-rescale-per-sample", LCM(), dict(num_inference_steps=20), PER_SAMPLE, 0.7),
    ("lcm-v-zsnr-scaling", LCM(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_scaling=3.0),
     dict(num_inference_steps=12), 4.0, 0.0),
    # a small timestep_scaling makes c_skip / c_out far from (0, 1) on every step
    ("lcm-eps-small-scaling", LCM(timestep_scaling=0.002), dict(num_inference_steps=10), 5.0, 0.0),
    ("lcm-sample-clip", LCM(prediction_type="sample", clip_sample=True, clip_sample_range=0.8),
     dict(num_inference_steps=10), 5.0, 0.0),
    ("lcm-eps-threshold-orig100", LCM(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                                      original_inference_steps=100), dict(num_inference_steps=25), 5.0, 0.0),
    ("lcm-linear-strength", LCM(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
     dict(num_inference_steps=10, strength=0.5), 3.0, 0.0),
    # custom timesteps with strength < 1: shorter than num_inference_steps, so noise on every step
    ("lcm-custom-strength", LCM(), dict(timesteps=[999, 859, 699, 499, 339, 259, 139, 59], strength=0.75),
     5.0, 0.0),
]


def check_teacher_forced(name, make, ts_kwargs, scale, rescale, backend, state=None) -> None:
    """Per step, from identical inputs: the scheduler's own output class and fields, its state (``state``,
    default ``state_of``) and the generator's state agree with diffusers' step on ``u + w (c - u)``."""
    state = state or state_of
    sched = make()
    sched.set_timesteps(**ts_kwargs)
    x = latents()
    gen = torch.Generator().manual_seed(1234)
    for t in sched.timesteps:
        mo = fake_model(sched.scale_model_input(x, t), t)
        twin, twin_gen = copy.deepcopy(sched), clone_gen(gen)
        ref = sched.step(diffusers_cfg(mo, scale, rescale), t, x, **generator_kwargs(sched, gen))
        got = step(mo, t, x, scheduler=twin, guidance_scale=scale, guidance_rescale=rescale, generator=twin_gen,
                   return_dict=True, backend=backend)
        assert type(got) is type(ref)    # the scheduler's own output class
        for f in ref.keys():             # prev_sample, and LCM's denoised
            assert rel_err(getattr(got, f), getattr(ref, f)) <= STEP_TOL, f"{name} {f} t={t}"
        assert_same_state(state(twin), state(sched), STEP_TOL)
        assert torch.equal(twin_gen.get_state(), gen.get_state()), "noise drawn differently from diffusers"
        x = ref.prev_sample


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,make,ts_kwargs,scale,rescale", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_teacher_forced_parity(name, make, ts_kwargs, scale, rescale, backend):
    check_teacher_forced(name, make, ts_kwargs, scale, rescale, backend)


def run_loop(make, ts_kwargs, mode, scale=2.0, seed=99):
    """A free-running loop; ``mode(i)`` says whether step i uses fastguide.step (True) or scheduler.step.
    (The toy model is not a denoiser: with a large scale, 25 noisy steps grow fp32 rounding past LOOP_TOL.)"""
    sched = make()
    sched.set_timesteps(**ts_kwargs)
    x = latents(seed=3)
    gen = torch.Generator().manual_seed(seed)
    for i, t in enumerate(sched.timesteps):
        mo = fake_model(sched.scale_model_input(x, t), t)
        if mode(i):
            x = step(mo, t, x, scheduler=sched, guidance_scale=scale, generator=gen)
        else:
            x = sched.step(diffusers_cfg(mo, scale), t, x, **generator_kwargs(sched, gen)).prev_sample
    return x, sched, gen


def generator_kwargs(sched, gen) -> dict:
    """``generator=gen`` for a scheduler whose ``step`` takes one (UniPC's takes none)."""
    return {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}


LOOPS = [
    ("sde2-karras", SDE(use_karras_sigmas=True), dict(num_inference_steps=25)),
    ("sde2-heun", SDE(solver_type="heun"), dict(num_inference_steps=20)),
    ("sde1", SDE(solver_order=1), dict(num_inference_steps=15)),
    ("lcm", LCM(), dict(num_inference_steps=12)),
    ("lcm-v", LCM(prediction_type="v_prediction"), dict(num_inference_steps=20)),
]
MODES = [lambda i: True, lambda i: i % 3 == 1, lambda i: i % 2 == 0, lambda i: i >= 5]


def check_whole_loop_and_switching(make, ts_kwargs, state=None) -> None:
    """Free-running loops that switch between fastguide.step and scheduler.step (MODES) end where diffusers'
    own loop ends: sample, scheduler state (``state``, default ``state_of``) and generator."""
    state = state or state_of
    ref, ref_sched, ref_gen = run_loop(make, ts_kwargs, lambda i: False)
    for mode in MODES:
        got, got_sched, got_gen = run_loop(make, ts_kwargs, mode)
        assert rel_err(got, ref) <= LOOP_TOL
        assert_same_state(state(got_sched), state(ref_sched), LOOP_TOL)
        assert torch.equal(got_gen.get_state(), ref_gen.get_state())


@pytest.mark.parametrize("name,make,ts_kwargs", LOOPS, ids=[c[0] for c in LOOPS])
def test_whole_loop_and_switching(name, make, ts_kwargs):
    check_whole_loop_and_switching(make, ts_kwargs)


@pytest.mark.parametrize("make,fields", [(SDE(), ("prev_sample",)), (LCM(), ("prev_sample", "denoised"))],
                         ids=["sde", "lcm"])
def test_return_dict_forms(make, fields):
    ours, theirs = make(), make()
    for s in (ours, theirs):
        s.set_timesteps(10)
    x = latents()
    for i, t in enumerate(ours.timesteps):
        mo = fake_model(x, t)
        g1, g2 = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        want_dict = i % 3 != 2
        want = theirs.step(diffusers_cfg(mo, 3.0), t, x, generator=g1, return_dict=want_dict)
        if i % 3 == 0:
            got = step(mo, t, x, scheduler=ours, guidance_scale=3.0, generator=g2, return_dict=True)
            assert type(got) is type(want)
            pairs = [(getattr(got, f), getattr(want, f)) for f in fields]
        elif i % 3 == 1:   # return_dict unset: the tensor; out= aliasing the sample
            x_ours = x.clone()
            got = step(mo, t, x_ours, scheduler=ours, guidance_scale=3.0, generator=g2, out=x_ours)
            assert got is x_ours
            pairs = [(got, want.prev_sample)]
        else:
            got = step(mo, t, x, scheduler=ours, guidance_scale=3.0, generator=g2, return_dict=False)
            assert isinstance(got, tuple) and len(got) == len(want) == len(fields)
            pairs = list(zip(got, want))
        for a, b in pairs:
            assert rel_err(a, b) <= STEP_TOL
        x = pairs[0][1]


def test_lcm_denoised_with_out_aliasing_the_sample():
    # denoised reads the sample, which out= overwrites: it must be computed first.
    ours, theirs = LCMScheduler(), LCMScheduler()
    for s in (ours, theirs):
        s.set_timesteps(6)
    x = latents()
    for t in ours.timesteps:
        mo = fake_model(x, t)
        want = theirs.step(diffusers_cfg(mo, 2.0), t, x, generator=torch.Generator().manual_seed(5))
        buf = x.clone()
        got = step(mo, t, buf, scheduler=ours, guidance_scale=2.0, generator=torch.Generator().manual_seed(5),
                   out=buf, return_dict=True)
        assert got.prev_sample is buf
        assert rel_err(got.prev_sample, want.prev_sample) <= STEP_TOL
        assert rel_err(got.denoised, want.denoised) <= STEP_TOL
        x = want.prev_sample


@pytest.mark.parametrize("make", [SDE(), LCM()], ids=["sde", "lcm"])
def test_plain_steps_noise_arg_generator_list_and_global_rng(make):
    ours, theirs = make(), make()
    for s in (ours, theirs):
        s.set_timesteps(8)
    x = latents()
    for i, t in enumerate(ours.timesteps):
        mo = fake_model(x, t)[B:]
        if i % 3 == 0:     # the caller's noise= (SDE: diffusers' variance_noise; LCM: what its generator draws)
            z = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(i))
            if isinstance(ours, LCMScheduler):
                want = theirs.step(mo, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
            else:
                want = theirs.step(mo, t, x, variance_noise=z).prev_sample
            got = step(mo, t, x, scheduler=ours, noise=z)
        elif i % 3 == 1:   # one generator per sample
            gens = [torch.Generator().manual_seed(10 + b) for b in range(B)]
            twins = [clone_gen(g) for g in gens]
            want = theirs.step(mo, t, x, generator=gens).prev_sample
            got = step(mo, t, x, scheduler=ours, generator=twins)
            assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, twins))
        else:              # torch's global RNG
            torch.manual_seed(i)
            want = theirs.step(mo, t, x).prev_sample
            torch.manual_seed(i)
            got = step(mo, t, x, scheduler=ours)
        assert rel_err(got, want) <= STEP_TOL
        x = want


def test_sde_half_precision_draws_noise_in_float32():
    sched = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    sched.set_timesteps(6)
    x = latents().half()
    gen = torch.Generator().manual_seed(2)
    for t in sched.timesteps:
        mo = fake_model(x.float(), t).half()
        twin, twin_gen = copy.deepcopy(sched), clone_gen(gen)
        ref = sched.step(diffusers_cfg(mo, 3.0), t, x, generator=gen).prev_sample
        got = step(mo, t, x, scheduler=twin, guidance_scale=3.0, generator=twin_gen)
        assert got.dtype == ref.dtype == torch.float16
        assert rel_err(got, ref) <= 2e-2
        assert torch.equal(twin_gen.get_state(), gen.get_state())
        x = ref


GRAD = 0.05 * torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("make", [SDE(), LCM()], ids=["sde", "lcm"])
def test_score_correction_term(make):
    # eps -= sigma g (sigma of the VP state x = alpha x0 + sigma eps, recorded in the plan) is the same as
    # stepping the scheduler on the corrected eps-prediction; for LCM the second output is ``denoised``.
    sched = make()
    sched.set_timesteps(10)
    x = latents()
    for i, t in enumerate(sched.timesteps):
        mo = fake_model(x, t)
        sigma = float(dropin.plan_for(sched).sigma[i])
        twin, gen = copy.deepcopy(sched), torch.Generator().manual_seed(i)
        ref = sched.step(diffusers_cfg(mo, 2.0) - sigma * GRAD, t, x, generator=clone_gen(gen))
        got, second = scheduler_step(mo, t, x, scheduler=twin, guidance_scale=2.0, generator=gen, want_x0=True,
                                     g_score=GRAD)
        assert rel_err(got, ref.prev_sample) <= STEP_TOL
        if isinstance(sched, LCMScheduler):
            assert rel_err(second, ref.denoised) <= STEP_TOL
        else:
            assert rel_err(twin.model_outputs[-1], sched.model_outputs[-1]) <= STEP_TOL
        x = ref.prev_sample


def _scheduled(make, **ts_kwargs):
    def build():
        sched = make()
        sched.set_timesteps(**(ts_kwargs or dict(num_inference_steps=8)))
        return sched
    return build


def SDE_OTHER(algorithm_type):
    # (diffusers refuses final_sigmas_type="zero", its default, for these)
    return lambda: DPMSolverMultistepScheduler(algorithm_type=algorithm_type, final_sigmas_type="sigma_min")


def mid_loop(make, steps_done: int = 2):
    """A scheduler of an 8-step schedule after ``steps_done`` CFG steps of fastguide.step."""
    sched = make()
    sched.set_timesteps(8)
    x = latents()
    for t in sched.timesteps[:steps_done]:
        x = step(fake_model(x, t), t, x, scheduler=sched, guidance_scale=2.0)
    return sched


BAD = [
    # (id, scheduler setup, timestep, name the message must contain)
    ("dpm-sde-non-plusplus", _scheduled(SDE_OTHER("sde-dpmsolver")), None, "algorithm_type"),
    ("dpm-dpmsolver", _scheduled(SDE_OTHER("dpmsolver")), None, "algorithm_type"),
    ("sde-order-4", _scheduled(SDE(solver_order=4)), None, "solver_order"),
    ("sde-learned-variance", _scheduled(SDE(variance_type="learned_range")), None, "variance_type"),
    ("sde-flow-sigmas", _scheduled(SDE(use_flow_sigmas=True)), None, "use_flow_sigmas"),
    ("lcm-flow-prediction", _scheduled(LCM(prediction_type="flow_prediction")), None, "prediction_type"),
    ("lcm-without-set-timesteps", LCMScheduler, 999, "set_timesteps"),
    ("lcm-timestep-not-at-step-index", lambda: mid_loop(LCM()), lambda s: s.timesteps[0], "timestep"),
    ("lcm-timestep-not-in-schedule", _scheduled(LCM()), lambda s: 500, "timestep"),
]


@pytest.mark.parametrize("case,setup,t,name", BAD, ids=[b[0] for b in BAD])
def test_unsupported_options_raise_and_change_nothing(case, setup, t, name):
    sched = setup()
    t = t(sched) if callable(t) else (t if t is not None else sched.timesteps[0])
    x = latents()
    mo = fake_model(x, t)
    gen = torch.Generator().manual_seed(0)
    before, x_before, gen_before = state_of(sched), x.clone(), gen.get_state()
    with pytest.raises(ValueError) as info:
        step(mo, t, x, scheduler=sched, guidance_scale=2.0, generator=gen)
    assert name in str(info.value), str(info.value)
    assert_same_state(state_of(sched), before, 0.0)
    assert torch.equal(x, x_before) and torch.equal(gen.get_state(), gen_before)
