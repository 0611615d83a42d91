"""Classifier / discriminator guidance inside a diffusers loop, against diffusers' own step plus the
guided-diffusion / EluCD / DG formulas applied by hand."""

import copy
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

import fastguide

B, SHAPE = 3, (3, 2, 4, 4)


def _classifier(x, t):
    # A smooth, t-dependent linear-softmax classifier over 5 classes.
    w = torch.linspace(-1, 1, x[0].numel() * 5, dtype=torch.float64).reshape(5, -1).to(x.dtype)
    return (x.flatten(1) @ w.T) * (1 + t[:, None].to(x.dtype) / 1000)


def _discriminator(x, t, y):
    return (x.flatten(1).sin().sum(1) * 0.3 + t.to(x.dtype) / 2000)


def _grad_log_softmax(x, t, y, scale):
    x = x.detach().requires_grad_(True)
    logp = torch.log_softmax(_classifier(x, torch.full((x.shape[0],), float(t))), dim=1)
    return torch.autograd.grad(logp[torch.arange(x.shape[0]), y].sum() * scale, x)[0]


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn((2 * B,) + SHAPE[1:], generator=g, dtype=torch.float64)
    return x, eps


def _cfg(eps, w):
    u, c = eps.chunk(2)
    return u + w * (c - u)


Y = torch.tensor([0, 3, 4])


def test_ddpm_adm_is_condition_mean():
    sched = DDPMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(20)
    ref = copy.deepcopy(sched)
    spec = fastguide.ClassifierGuidance(_classifier, scale=2.0)
    for i, t in enumerate(sched.timesteps[:4]):
        x, eps = _inputs(i)
        gen_a, gen_b = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        got = fastguide.step(eps, t, x, scheduler=sched, guidance_scale=3.0, generator=gen_a,
                             guidance=[spec], y=Y)
        # guided-diffusion condition_mean: mu + Sigma * s * grad log p(y | x_t), noise unguided.
        expect = ref.step(_cfg(eps, 3.0), t, x, generator=gen_b).prev_sample
        expect = expect + ref._get_variance(int(t)) * _grad_log_softmax(x, t, Y, 2.0)
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_adm_is_condition_score(clip):
    sched = DDIMScheduler(num_train_timesteps=1000, clip_sample=clip)
    sched.set_timesteps(10)
    spec = fastguide.ClassifierGuidance(_classifier, scale=1.5)
    for i, t in enumerate(sched.timesteps[:4]):
        x, eps = _inputs(10 + i)
        got = fastguide.step(eps, t, x, scheduler=sched, guidance_scale=2.0, guidance=[spec], y=Y)
        # guided-diffusion condition_score: eps' = eps - sqrt(1 - abar_t) * grad.
        abar = float(sched.alphas_cumprod[int(t)])
        g = _grad_log_softmax(x, t, Y, 1.5)
        eps_guided = _cfg(eps, 2.0) - math.sqrt(1 - abar) * g
        if not clip:  # without clipping that is exactly the scheduler's step on eps'
            expect = copy.deepcopy(sched).step(eps_guided, t, x).prev_sample
        else:  # with clipping, guided-diffusion's order: clip x0 first, then correct it (not re-clipped)
            prev_t = int(t) - 100
            abar_prev = float(sched.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
            x0 = ((x - math.sqrt(1 - abar) * _cfg(eps, 2.0)) / math.sqrt(abar)).clamp(-1, 1)
            x0 = x0 + (1 - abar) / math.sqrt(abar) * g
            expect = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps_guided
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def test_euler_discriminator_guidance_is_score_correction():
    sched = EulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(8)
    ref = copy.deepcopy(sched)
    spec = fastguide.DiscriminatorGuidance(_discriminator, weight=1.5, t_min=0.3)
    for i, t in enumerate(sched.timesteps):
        x, eps = _inputs(20 + i)
        x = x * 5
        got = fastguide.step(eps, t, x, scheduler=sched, guidance_scale=2.0, guidance=[spec])
        sigma = float(ref.sigmas[ref.step_index if ref.step_index is not None else 0])
        leaf = x.detach().requires_grad_(True)
        tt = torch.full((B,), float(t), dtype=torch.float64)
        logit = _discriminator(leaf / math.sqrt(1 + sigma ** 2), tt, None)
        g = torch.autograd.grad(logit.sum(), leaf)[0] * (1.5 if float(t) / 1000 >= 0.3 else 0.0)
        expect = ref.step(_cfg(eps, 2.0) - sigma * g, t, x).prev_sample
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_ma_x0_guidance_with_sine_variance(variance_type):
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type=variance_type, clip_sample=True)
    sched.set_timesteps(25)
    ref = copy.deepcopy(sched)
    spec = fastguide.ClassifierGuidance(_classifier, scale=1.0, input="x0", tau1=1.0, tau2=0.5, gamma=0.3)
    n = len(sched.timesteps)
    betas = [1 - float(sched.alphas_cumprod[int(t)]) / (float(sched.alphas_cumprod[int(p)]) if p >= 0 else 1.0)
             for t, p in zip(sched.timesteps, list(sched.timesteps[1:]) + [-1])]
    if variance_type == "learned_range":
        sigma_max = max(betas)
    else:
        fixed = [float(ref._get_variance(int(t))) for t in sched.timesteps]
        sigma_max = max(fixed)
    for index in (0, 7, 24):
        t = sched.timesteps[index]
        x, eps = _inputs(30 + index)
        channels = SHAPE[1] * (2 if variance_type == "learned_range" else 1)
        out = torch.randn((2 * B, channels) + SHAPE[2:], generator=torch.Generator().manual_seed(index),
                          dtype=torch.float64) * 0.5
        gen_a, gen_b = torch.Generator().manual_seed(index), torch.Generator().manual_seed(index)
        got = fastguide.step(out, t, x, scheduler=sched, guidance_scale=2.0, generator=gen_a,
                             guidance=[spec], y=Y)
        u, c = out.chunk(2)
        guided = torch.cat([u[:, :SHAPE[1]] + 2.0 * (c[:, :SHAPE[1]] - u[:, :SHAPE[1]]), c[:, SHAPE[1]:]], 1)
        res = ref.step(guided, t, x, generator=gen_b)
        x0 = res.pred_original_sample.detach().requires_grad_(True)
        logits = _classifier(x0, torch.full((B,), float(t)))
        objective = logits[torch.arange(B), Y] - torch.logsumexp(0.5 * logits, dim=1)
        g = torch.autograd.grad(objective.sum(), x0)[0]
        if variance_type == "learned_range":
            frac = (c[:, SHAPE[1]:] + 1) / 2
            prev_t = int(sched.timesteps[index + 1]) if index + 1 < n else -1
            abar_t = float(sched.alphas_cumprod[int(t)])
            abar_p = float(sched.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
            beta = 1 - abar_t / abar_p
            post = max(beta * (1 - abar_p) / (1 - abar_t), 1e-20)
            variance = torch.exp(frac * math.log(beta) + (1 - frac) * math.log(post))
        else:
            variance = fixed[index]
        extra = max(0.0, 0.3 * sigma_max * math.sin(math.pi * (n - 1 - index) / n))
        torch.testing.assert_close(got, res.prev_sample + (variance + extra) * g, rtol=1e-5, atol=1e-6)


def test_dropin_guidance_bad_input_leaves_everything_untouched():
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(10)
    x, eps = _inputs(0)
    t = sched.timesteps[0]
    before = x.clone()
    with pytest.raises(ValueError, match="y"):
        fastguide.step(eps, t, x, scheduler=sched, guidance_scale=2.0,
                       guidance=[fastguide.ClassifierGuidance(_classifier)])
    with pytest.raises(ValueError, match="input='x0'"):
        fastguide.step(eps, t, x, scheduler=sched, guidance_scale=2.0, y=Y,
                       guidance=[fastguide.ClassifierGuidance(_classifier, input="x0")])
    with pytest.raises(ValueError, match="guidance_scale"):
        fastguide.step(eps, t, x, scheduler=sched, guidance=[fastguide.CFG(2.0)])
    with pytest.raises(TypeError, match="guidance"):
        fastguide.step(eps, t, x, scheduler=sched, guidance_scale=2.0, guidance=["adm"])
    with pytest.raises(ValueError, match="y must have"):
        fastguide.step(eps, t, x, scheduler=sched, guidance_scale=2.0, y=torch.tensor([1, 2]),
                       guidance=[fastguide.ClassifierGuidance(_classifier)])

    def broken(x, t):
        raise RuntimeError("classifier exploded")
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    with pytest.raises(RuntimeError, match="exploded"):
        fastguide.step(eps, t, x, scheduler=sched, guidance_scale=2.0, y=Y, generator=gen, eta=0.5,
                       guidance=[fastguide.ClassifierGuidance(broken)])
    assert torch.equal(gen.get_state(), state) and torch.equal(x, before)


def test_nan_check_is_opt_in():
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(10)
    x, eps = _inputs(1)
    eps[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fastguide.step(eps, sched.timesteps[0], x, scheduler=sched, guidance_scale=2.0, check_finite=True)
