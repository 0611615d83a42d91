"""Schedules against diffusers: betas, zero-SNR, timestep spacings, karras sigmas, from_diffusers, and the
native DDIM loop on a diffusers-derived schedule against the diffusers loop."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

import fastguide
from fastguide import Schedule


@pytest.mark.parametrize("beta_schedule,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                                     ("cosine", None, None)])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(beta_schedule, start, end, zero_snr):
    kw = {} if start is None else dict(beta_start=start, beta_end=end)
    ours = Schedule.ddpm(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr, **kw)
    theirs = DDIMScheduler(beta_schedule="squaredcos_cap_v2" if beta_schedule == "cosine" else beta_schedule,
                           rescale_betas_zero_snr=zero_snr, **kw)
    ref = theirs.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ours.alphas_cumprod[:-1], ref[:-1], rtol=2e-5, atol=1e-8)
    if zero_snr:
        assert ours.alphas_cumprod[-1] == 2.0 ** -24  # diffusers' usable stand-in for zero
    else:
        np.testing.assert_allclose(ours.alphas_cumprod[-1], ref[-1], rtol=2e-4)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 333])
def test_timestep_spacings_match_diffusers(spacing, steps):
    offset = 1 if spacing == "leading" else 0
    ours = Schedule.ddpm(timestep_spacing=spacing, steps_offset=offset).timesteps(steps)
    theirs = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    theirs.set_timesteps(steps)
    np.testing.assert_array_equal(ours, theirs.timesteps.numpy())
    euler = EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=offset)
    euler.set_timesteps(steps)
    frac = Schedule.ddpm(timestep_spacing=spacing, steps_offset=offset).timesteps(steps, integer=False)
    np.testing.assert_allclose(frac, euler.timesteps.double().numpy(), rtol=1e-6)


def test_sigma_schedule_matches_diffusers_euler_with_karras():
    theirs = EulerDiscreteScheduler(use_karras_sigmas=True, timestep_spacing="linspace")
    theirs.set_timesteps(12)
    sched = Schedule.from_diffusers(theirs)
    sigmas, ts = fastguide.samplers.sigma_schedule(sched, 12)
    np.testing.assert_allclose(sigmas, theirs.sigmas.double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(ts, theirs.timesteps.double().numpy(), rtol=1e-4, atol=1e-3)


def test_from_diffusers_reads_the_config():
    s = DDPMScheduler(prediction_type="v_prediction", variance_type="learned_range", timestep_spacing="trailing",
                      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched = Schedule.from_diffusers(s)
    assert (sched.prediction_type, sched.variance_type, sched.timestep_spacing) == \
        ("v_prediction", "learned_range", "trailing")
    np.testing.assert_array_equal(sched.alphas_cumprod, s.alphas_cumprod.double().numpy())
    with pytest.raises(ValueError, match="prediction_type"):
        Schedule.from_diffusers(DDPMScheduler(prediction_type="flow_prediction"))


def test_edm_karras_sigmas_closed_form():
    s = Schedule.edm(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    sig = s.karras_sigmas(18)
    i = np.arange(18)
    expect = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sig, expect, rtol=1e-12)
    assert sig[0] == pytest.approx(80.0) and sig[-1] == pytest.approx(0.002)


def test_vp_time_of_sigma_inverts_the_vp_sde():
    tau = np.linspace(1e-3, 1.0, 50)
    sigma = np.sqrt(np.exp(0.1 * tau + 0.5 * 19.9 * tau ** 2) - 1)
    np.testing.assert_allclose(fastguide.samplers.schedule.vp_time_of_sigma(sigma), tau, rtol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_native_ddim_equals_the_diffusers_ddim_loop(prediction_type):
    theirs = DDIMScheduler(prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=True)
    theirs.set_timesteps(20)
    schedule = Schedule.from_diffusers(theirs)
    w = torch.linspace(-0.5, 0.5, 3 * 4 * 4).reshape(1, 3, 4, 4)

    def model(x, t, y):  # deterministic, t- and label-dependent
        return torch.tanh(x) * 0.7 + w * (1 + t[:, None, None, None] / 1000) \
            + (y.float() * 0.1)[:, None, None, None]

    y = torch.tensor([1, 2])
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    got = fastguide.sample(model, x_T, schedule=schedule, sampler="ddim", steps=20, y=y,
                           guidance=[fastguide.CFG(2.5, null_label=0)])
    x = x_T.clone()
    for t in theirs.timesteps:
        tt = torch.full((2,), float(t))
        u, c = model(x, tt, torch.zeros_like(y)), model(x, tt, y)
        x = theirs.step(u + 2.5 * (c - u), t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="beta_schedule"):
        Schedule.ddpm(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="prediction_type"):
        Schedule.ddpm(prediction_type="x0")
    with pytest.raises(ValueError, match="timestep_spacing"):
        Schedule.ddpm(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="sigma_min"):
        Schedule.edm(sigma_min=10.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="steps"):
        Schedule.ddpm().timesteps(0)
    with pytest.raises(ValueError, match="betas"):
        Schedule.ddpm(betas=[0.1])
