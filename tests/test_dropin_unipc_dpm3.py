"""fastguide.step against diffusers' ``UniPCMultistepScheduler`` (bh1 / bh2, orders 1 and 2, its corrector) and
``DPMSolverMultistepScheduler(solver_order=3)`` (DPM++ 3M, ODE and SDE).

As in tests/test_dropin_sde_lcm.py: teacher-forced steps (the diffusers scheduler steps on ``u + w (c - u)``,
a deep copy steps through fastguide.step on the raw 2B-row output; per step we compare the outputs and the
whole scheduler state: UniPC's ``last_sample``, ``this_order``, ``timestep_list`` too), then free-running loops
that switch between ``scheduler.step`` and ``fastguide.step``, and the rejected options.
"""

from __future__ import annotations

import copy


import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler  # noqa: E402

import fastguide  # noqa: E402
from fastguide.dropin import step  # noqa: E402

from test_dropin_diffusers import diffusers_cfg, rel_err  # noqa: E402  (the shared CFG reference)
from test_dropin_sde_lcm import (B, check_teacher_forced, check_whole_loop_and_switching, fake_model,  # noqa: E402
                                 latents, mid_loop)

STEP_TOL = 1e-5     # relative to the largest magnitude of the reference, one step from identical inputs
CPU_BACKENDS = [b for b in ("torch", "cpp") if fastguide.backends()[b]]
PER_SAMPLE = torch.tensor([3.0, 6.5])


def UNI(**config):
    return lambda: UniPCMultistepScheduler(**config)


def DPM3(**config):
    return lambda: DPMSolverMultistepScheduler(solver_order=3, **config)


def state_of(s) -> dict:
    """Everything the scheduler's next step reads."""
    st = {"step_index": s._step_index, "lower_order_nums": s.lower_order_nums,
          "model_outputs": [None if m is None else m.clone() for m in s.model_outputs]}
    if isinstance(s, UniPCMultistepScheduler):
        st.update(this_order=getattr(s, "this_order", None), timestep_list=[None if t is None else float(t)
                                                                            for t in s.timestep_list],
                  last_sample=None if s.last_sample is None else s.last_sample.clone())
    return st


# (id, scheduler factory, set_timesteps kwargs, guidance_scale, guidance_rescale)
CONFIGS = [
    # UniPC: bh1 / bh2, orders 1 and 2, the lower-order final step or not, predictions, sigmas, thresholding,
    # a disabled corrector, flow sigmas. (bh1 with a zero final sigma is NaN in diffusers itself: sigma_min.)
    ("uni-bh2", UNI(), dict(num_inference_steps=10), 5.0, 0.0),
    ("uni-bh2-rescale-per-sample", UNI(), dict(num_inference_steps=20), PER_SAMPLE, 0.7),
    ("uni-bh1-sigmamin", UNI(solver_type="bh1", final_sigmas_type="sigma_min"), dict(num_inference_steps=12),
     4.0, 0.0),
    ("uni-order1", UNI(solver_order=1), dict(num_inference_steps=10), 5.0, 0.0),
    ("uni-bh1-order1-sigmamin", UNI(solver_order=1, solver_type="bh1", final_sigmas_type="sigma_min"),
     dict(num_inference_steps=8), PER_SAMPLE, 0.0),
    ("uni-v-karras", UNI(prediction_type="v_prediction", use_karras_sigmas=True), dict(num_inference_steps=15),
     4.0, 0.3),
    ("uni-nolof-sigmamin", UNI(lower_order_final=False, final_sigmas_type="sigma_min"), dict(num_inference_steps=9),
     5.0, 0.0),
    ("uni-disable-corrector", UNI(disable_corrector=[0, 4]), dict(num_inference_steps=10), 5.0, 0.0),
    ("uni-sample-threshold", UNI(prediction_type="sample", thresholding=True, sample_max_value=1.2),
     dict(num_inference_steps=10), 5.0, 0.0),
    ("uni-flow-shift", UNI(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
     dict(num_inference_steps=12), 4.0, 0.0),
    ("uni-zsnr-trailing", UNI(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                              prediction_type="v_prediction"), dict(num_inference_steps=10), PER_SAMPLE, 0.5),
    # DPM++ 3M: ODE and SDE, lower-order final rules (short / long schedules), Karras, predictions.
    ("dpm3", DPM3(), dict(num_inference_steps=10), 5.0, 0.0),
    ("dpm3-long", DPM3(), dict(num_inference_steps=20), PER_SAMPLE, 0.7),
    ("dpm3-sde", DPM3(algorithm_type="sde-dpmsolver++"), dict(num_inference_steps=12), 5.0, 0.0),
    ("dpm3-sde-karras-long", DPM3(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
     dict(num_inference_steps=18), 4.0, 0.0),
    ("dpm3-v-nolof-sigmamin", DPM3(prediction_type="v_prediction", lower_order_final=False,
                                   final_sigmas_type="sigma_min"), dict(num_inference_steps=12), 4.0, 0.0),
    ("dpm3-heun-sample-threshold", DPM3(solver_type="heun", prediction_type="sample", thresholding=True,
                                        sample_max_value=1.2), dict(num_inference_steps=10), 5.0, 0.0),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,make,ts_kwargs,scale,rescale", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_teacher_forced_parity(name, make, ts_kwargs, scale, rescale, backend):
    check_teacher_forced(name, make, ts_kwargs, scale, rescale, backend, state_of)


LOOPS = [
    ("uni-bh2", UNI(), dict(num_inference_steps=20)),
    ("uni-bh1-v-sigmamin", UNI(solver_type="bh1", prediction_type="v_prediction", final_sigmas_type="sigma_min"),
     dict(num_inference_steps=16)),
    ("uni-flow", UNI(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
     dict(num_inference_steps=12)),
    ("dpm3", DPM3(), dict(num_inference_steps=20)),
    ("dpm3-sde-karras", DPM3(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), dict(num_inference_steps=16)),
]


@pytest.mark.parametrize("name,make,ts_kwargs", LOOPS, ids=[c[0] for c in LOOPS])
def test_whole_loop_and_switching(name, make, ts_kwargs):
    check_whole_loop_and_switching(make, ts_kwargs, state_of)


def test_unipc_out_aliasing_the_sample_keeps_last_sample():
    """out=latents overwrites the sample that diffusers keeps as last_sample (the next corrector's start)."""
    ours, theirs = UniPCMultistepScheduler(disable_corrector=[2]), UniPCMultistepScheduler(disable_corrector=[2])
    for s in (ours, theirs):
        s.set_timesteps(8)
    x = latents()
    for t in ours.timesteps:
        mo = fake_model(x, t)
        want = theirs.step(diffusers_cfg(mo, 3.0), t, x).prev_sample
        buf = x.clone()
        got = step(mo, t, buf, scheduler=ours, guidance_scale=3.0, out=buf)
        assert got is buf
        assert rel_err(got, want) <= STEP_TOL
        assert rel_err(ours.last_sample, theirs.last_sample) <= STEP_TOL
        x = want


def test_unipc_bh1_zero_final_sigma_is_nan_as_in_diffusers():
    ours, theirs = UniPCMultistepScheduler(solver_type="bh1"), UniPCMultistepScheduler(solver_type="bh1")
    for s in (ours, theirs):
        s.set_timesteps(6)
    x = latents()
    for i, t in enumerate(ours.timesteps):
        mo = fake_model(x, t)
        want = theirs.step(diffusers_cfg(mo, 3.0), t, x).prev_sample
        got = step(mo, t, x, scheduler=ours, guidance_scale=3.0)
        if i < len(ours.timesteps) - 1:
            assert rel_err(got, want) <= STEP_TOL
        else:  # diffusers subtracts alpha_t B(h) * 0 with B(h) = -inf
            assert torch.isnan(want).all() and torch.isnan(got).all()
        x = want


def test_half_precision():
    for make in (UNI(), DPM3()):
        ours, theirs = make(), make()
        for s in (ours, theirs):
            s.set_timesteps(8)
        x = latents().half()
        for t in ours.timesteps:
            mo = fake_model(x.float(), t).half()
            want = theirs.step(diffusers_cfg(mo, 3.0), t, x).prev_sample
            got = step(mo, t, x, scheduler=ours, guidance_scale=3.0)
            assert got.dtype == torch.float16
            assert rel_err(got.float(), want.float()) <= 5e-3
            x = want


@pytest.mark.parametrize("make,match", [
    (UNI(predict_x0=False), "predict_x0"),
    (UNI(solver_order=3), "solver_order"),
    (UNI(prediction_type="flow_prediction"), "use_flow_sigmas"),
], ids=["predict-eps", "order3", "flow-on-vp"])
def test_unsupported_unipc_options(make, match):
    sched = make()
    sched.set_timesteps(6)
    x = latents()
    with pytest.raises(ValueError, match=match):
        step(fake_model(x, sched.timesteps[0]), sched.timesteps[0], x, scheduler=sched, guidance_scale=2.0)
    assert sched.step_index is None and sched.lower_order_nums == 0


def test_unipc_refuses_solver_p_and_guidance_on_flow_sigmas():
    sched = UniPCMultistepScheduler(solver_p=DPMSolverMultistepScheduler())
    sched.set_timesteps(6)
    x = latents()
    with pytest.raises(ValueError, match="solver_p"):
        step(fake_model(x, 999), sched.timesteps[0], x, scheduler=sched, guidance_scale=2.0)
    sched = UNI(use_flow_sigmas=True, prediction_type="flow_prediction")()
    sched.set_timesteps(6)
    spec = fastguide.ClassifierGuidance(lambda x, t: x.flatten(1)[:, :3], scale=1.0)
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        step(fake_model(x, 999)[B:], sched.timesteps[0], x, scheduler=sched, guidance=[spec],
             y=torch.zeros(B, dtype=torch.long))
    assert sched.step_index is None
    sched = UNI()()
    sched.set_timesteps(6)
    with pytest.raises(ValueError, match="input='x0'"):   # Ma et al.'s recipe is a DDPM mean shift here
        step(fake_model(x, 999)[B:], sched.timesteps[0], x, scheduler=sched, guidance=[
             fastguide.ClassifierGuidance(lambda x, t: x.flatten(1)[:, :3], input="x0")],
             y=torch.zeros(B, dtype=torch.long))
    assert sched.step_index is None


def _classifier(x, t):
    return torch.tanh(x.flatten(1)[:, :12].reshape(x.shape[0], 3, 4)).sum(2) * (1.0 + t.reshape(-1, 1) / 1000.0)


def _discriminator(x, t, y=None):
    return torch.tanh(x.flatten(1)).mean(1) * 3.0 + t / 1000.0


def test_unipc_classifier_and_discriminator_guidance_by_hand():
    """Guidance is a score correction of the model output, eps -= sigma g (the networks see the state and the
    timestep, the DG window in t / T): every call equals diffusers' own step on the corrected prediction, the
    corrector included (it reads the corrected x0 the step stored)."""
    y = torch.tensor([1, 2])
    specs = [fastguide.ClassifierGuidance(_classifier, scale=1.5),
             fastguide.DiscriminatorGuidance(_discriminator, weight=0.8, t_min=0.2, t_max=0.9)]
    for solver_type in ("bh2", "bh1"):
        ours = UNI(solver_type=solver_type, final_sigmas_type="sigma_min")()
        ours.set_timesteps(8)
        theirs = copy.deepcopy(ours)
        sigmas = fastguide.dropin.plan_for(ours).sigma
        x = latents()
        for i, t in enumerate(ours.timesteps):
            mo = fake_model(x, t)
            tt = torch.full((B,), float(t))
            with torch.enable_grad():
                leaf = x.detach().clone().requires_grad_(True)
                obj = 1.5 * torch.log_softmax(_classifier(leaf, tt), 1)[torch.arange(B), y]
                if 0.2 <= float(t) / 1000 <= 0.9:
                    obj = obj + 0.8 * _discriminator(leaf, tt).clamp(-11.5, 11.5)
                (g,) = torch.autograd.grad(obj.sum(), leaf)
            want = theirs.step(diffusers_cfg(mo, 3.0) - float(sigmas[i]) * g, t, x).prev_sample
            got = step(mo, t, x, scheduler=ours, guidance_scale=3.0, guidance=specs, y=y)
            assert rel_err(got, want) <= STEP_TOL, (solver_type, i)
            assert rel_err(ours.last_sample, theirs.last_sample) <= STEP_TOL
            assert rel_err(ours.model_outputs[-1], theirs.model_outputs[-1]) <= STEP_TOL
            x = want


def test_unipc_state_errors_leave_the_scheduler_alone():
    sched = mid_loop(UNI())
    x = latents()
    before = state_of(sched)
    sched.last_sample = sched.last_sample[:1]
    with pytest.raises(ValueError, match="last_sample"):
        step(fake_model(x, sched.timesteps[2]), sched.timesteps[2], x, scheduler=sched, guidance_scale=2.0)
    assert sched.step_index == before["step_index"] and sched.lower_order_nums == before["lower_order_nums"]


def test_unipc_is_not_traced_by_compile():
    sched = UniPCMultistepScheduler()
    sched.set_timesteps(4)
    fastguide.dropin.prepare(sched)
    x = latents()

    @torch.compile(fullgraph=True, backend="eager")
    def denoise(mo, t, x):
        return step(mo, t, x, scheduler=sched, guidance_scale=2.0)

    with pytest.raises(Exception, match="UniPCMultistepScheduler inside torch.compile"):
        denoise(fake_model(x, 999), sched.timesteps[0], x)
