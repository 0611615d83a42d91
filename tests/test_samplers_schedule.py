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


# ---------------------------------------------------------------------------------------------------
# Schedule parameters are checked where the schedule is built, by name

@pytest.mark.parametrize("kw,name", [
    (dict(beta_start=-1), "beta_start"),                       # was: sample() -> "math domain error"
    (dict(beta_start=0.0), "beta_start"),
    (dict(beta_start=1.0), "beta_start"),
    (dict(beta_end=1.5), "beta_end"),
    (dict(beta_end=0.0), "beta_end"),
    (dict(beta_start=float("nan")), "beta_start"),
    (dict(beta_end=float("inf")), "beta_end"),
    (dict(beta_start="1e-4"), "beta_start"),
    (dict(beta_start=None), "beta_start"),
    (dict(beta_schedule="scaled_linear", beta_start=-0.01), "beta_start"),   # sqrt of a negative beta
    (dict(beta_schedule="scaled_linear", beta_end=1.0), "beta_end"),
    (dict(beta_schedule="cosine", beta_start="x"), "beta_start"),           # ignored by cosine, but a number
    # alphā underflows fp32 (1e-161): was accepted, then inf/NaN samples
    (dict(beta_start=0.5, beta_end=0.1), "beta_start=0.5, beta_end=0.1"),
    (dict(beta_start=0.1, beta_end=0.5), "beta_start=0.1, beta_end=0.5"),
    (dict(num_train_timesteps=100000, beta_end=0.02), "num_train_timesteps=100000"),
    # 1 - beta rounds to 1: alphā does not decrease, sigma(t) is not invertible
    (dict(beta_start=1e-20, beta_end=1e-20), "beta_start=1e-20"),
    (dict(num_train_timesteps=1), "num_train_timesteps"),
    (dict(num_train_timesteps=0), "num_train_timesteps"),
    (dict(num_train_timesteps=1000.0), "num_train_timesteps"),
    (dict(num_train_timesteps=True), "num_train_timesteps"),
    (dict(steps_offset=-1), "steps_offset"),
    (dict(steps_offset=1.0), "steps_offset"),
    (dict(steps_offset=None), "steps_offset"),
    (dict(rescale_betas_zero_snr=1), "rescale_betas_zero_snr"),
    (dict(rescale_betas_zero_snr="False"), "rescale_betas_zero_snr"),
    (dict(use_karras_sigmas=0), "use_karras_sigmas"),
    (dict(use_karras_sigmas=None), "use_karras_sigmas"),
    (dict(beta_schedule="squaredcos_cap_v2"), "beta_schedule"),
    (dict(variance_type="learned"), "variance_type"),
    (dict(betas=[0.1, 0.0, 0.2]), "betas"),
    (dict(betas=[0.1, float("nan")]), "betas"),
    (dict(betas=[[0.1, 0.2]]), "betas"),
    (dict(betas="0.1,0.2"), "betas"),
    (dict(betas=[0.5] * 2000), "betas"),                      # alphā = 2^-2000 underflows
])
def test_ddpm_bad_parameters_are_named_at_construction(kw, name):
    with pytest.raises((ValueError, TypeError)) as info:
        Schedule.ddpm(**kw)
    assert name in str(info.value), str(info.value)


def test_ddpm_checked_schedule_samples_finite_values():
    """What the checks let through samples finite values, on every sampler family; a decreasing linear beta
    schedule is valid (betas in (0, 1), alphā decreasing) and is accepted, and so is a schedule whose
    alphā falls to 3e-23 (sigma_max ~ 2e11), which the fp32 tables still hold."""
    def model(x, t, y=None):
        return 0.5 * torch.tanh(x)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    decreasing = Schedule.ddpm(beta_start=0.02, beta_end=1e-4)
    assert np.all(np.diff(decreasing.alphas_cumprod) < 0)
    np.testing.assert_allclose(decreasing.alphas_cumprod[-1], Schedule.ddpm().alphas_cumprod[-1], rtol=1e-9)
    for schedule in (decreasing, Schedule.ddpm(beta_end=0.1), Schedule.ddpm(beta_schedule="cosine",
                                                                            beta_start=0, beta_end=0)):
        for sampler in ("ddpm", "ddim", "euler", "heun", "dpmpp_2m"):
            x = fastguide.sample(model, x_T, schedule=schedule, sampler=sampler, steps=6,
                                 generator=torch.Generator().manual_seed(1))
            assert torch.isfinite(x).all(), sampler


def test_ddpm_zero_snr_and_explicit_betas_still_accepted():
    s = Schedule.ddpm(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert s.alphas_cumprod[-1] == 2.0 ** -24
    s = Schedule.ddpm(betas=np.linspace(1e-4, 0.02, 50))
    assert s.num_train_timesteps == 50
    s = Schedule.ddpm(steps_offset=np.int64(1), num_train_timesteps=np.int32(500))  # numpy ints are ints
    assert s.steps_offset == 1 and isinstance(s.steps_offset, int) and s.num_train_timesteps == 500


@pytest.mark.parametrize("kw,name", [
    (dict(sigma_min=0.0), "sigma_min"), (dict(sigma_min=-0.1), "sigma_min"),
    (dict(sigma_min=float("nan")), "sigma_min"), (dict(sigma_min="0.002"), "sigma_min"),
    (dict(sigma_min=True), "sigma_min"),
    (dict(sigma_max=float("inf")), "sigma_max"), (dict(sigma_max=float("nan")), "sigma_max"),
    (dict(sigma_max=0.001), "sigma_min"), (dict(sigma_max=None), "sigma_max"),
    (dict(rho=0.0), "rho"), (dict(rho=-7.0), "rho"), (dict(rho=float("inf")), "rho"), (dict(rho="7"), "rho"),
    (dict(sigma_data=0.0), "sigma_data"), (dict(sigma_data=float("nan")), "sigma_data"),
    (dict(sigma_data=None), "sigma_data"),
    (dict(prediction_type="v_prediction"), "prediction_type"),
])
def test_edm_bad_parameters_are_named_at_construction(kw, name):
    with pytest.raises((ValueError, TypeError)) as info:
        Schedule.edm(**kw)
    assert name in str(info.value), str(info.value)


def test_edm_parameters_are_stored_as_floats():
    s = Schedule.edm(sigma_min=1, sigma_max=np.float32(50.0), rho=3, sigma_data=1)
    assert (s.sigma_min, s.sigma_max, s.rho, s.sigma_data) == (1.0, 50.0, 3.0, 1.0)
    assert all(type(v) is float for v in (s.sigma_min, s.sigma_max, s.rho, s.sigma_data))


# ---------------------------------------------------------------------------------------------------
# heun on a VP schedule is diffusers' HeunDiscreteScheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("karras", [False, True])
def test_native_heun_on_vp_equals_the_diffusers_heun_loop(prediction_type, karras):
    """``sampler="heun"`` on a VP schedule against diffusers' ``HeunDiscreteScheduler`` loop (leading spacing,
    whose ``init_noise_sigma`` is fastguide's ``sqrt(1 + sigma_max^2)``): 2 N - 1 model calls, the model
    seeing ``x / sqrt(1 + sigma^2)`` and the training timestep of each stage."""
    from diffusers import HeunDiscreteScheduler
    steps = 8
    theirs = HeunDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1,
                                   use_karras_sigmas=karras)
    theirs.set_timesteps(steps)
    schedule = Schedule.from_diffusers(theirs)
    w = torch.linspace(-0.5, 0.5, 3 * 4 * 4).reshape(1, 3, 4, 4)

    def model(x, t, y=None):  # deterministic, t-dependent (t: a [B] tensor here, a scalar from diffusers)
        tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1) / 1000
        return torch.tanh(x) * 0.7 + w * (1 + tt) - 0.2 * tt * x

    calls = []

    def counting(x, t, y=None):
        calls.append(t.clone())
        return model(x, t, y)

    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    got = fastguide.sample(counting, x_T, schedule=schedule, sampler="heun", steps=steps)
    assert len(calls) == 2 * steps - 1
    x = x_T * theirs.init_noise_sigma
    seen = []
    for t in theirs.timesteps:
        seen.append(float(t))
        x = theirs.step(model(theirs.scale_model_input(x, t), t), t, x).prev_sample
    np.testing.assert_allclose([float(c[0]) for c in calls], seen, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got, x, rtol=2e-4, atol=2e-4)
