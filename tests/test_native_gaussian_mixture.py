"""Exact Gaussian-mixture checks of the guidance methods in ``fastguide.sample``.

Data: a mixture of K=3 isotropic Gaussians in 2-D (samples of shape [B, 2]). Everything a sampler needs is
in closed form: on the VP schedule ``x_t = a x0 + s eps`` component k is ``N(a mu_k, (a^2 S0^2 + s^2) I)``,
so the marginal eps-prediction is ``-s * grad log p_t``, the class-conditional one is
``s (x - a mu_y) / v``, the exact noisy classifier's logits are ``log pi_k + log N_k(x_t)`` and the exact
discriminator logit between two mixtures with different weights is the log ratio of their densities.

Statistics use fixed seeds; each tolerance is stated in units of the standard error of the estimate
(4.5 sigma), on top of the sampler's own discretization error where that is not negligible. That error is
computed here in closed form: the guided samplers at scale 1 are exactly (DDIM) or to second order per step
(DDPM) the sampler of the class-conditional Gaussian, a linear-Gaussian recursion whose output mean and
variance are computed below from the schedule alone.
"""

import math

import numpy as np
import pytest
import torch

import fastguide
from fastguide import Schedule

F64 = torch.float64
MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=F64)   # >= 10 S0 apart
S0 = 0.4
PI = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
NCLS = 3
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))   # linear-1000, as Schedule.ddpm()
ABAR_T = torch.tensor(ABAR, dtype=F64)
Z = 4.5  # tolerance in standard errors


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _vp(t):
    """(a, s) of the training timesteps t (integers here: DDPM/DDIM on the guided spacing)."""
    ab = ABAR_T[t.to(F64).round().long()]
    return ab.sqrt(), (1 - ab).sqrt()


def _log_joint(x, mean_scale, var, pi):
    """[B, K]: log pi_k + log N(x; mean_scale * mu_k, var I) in 2-D."""
    d2 = ((x[:, None, :] - mean_scale[:, None, None] * MEANS[None]) ** 2).sum(-1)
    return torch.log(pi)[None] - d2 / (2 * var[:, None]) - torch.log(2 * math.pi * var)[:, None]


def eps_marginal(x, t, pi=PI):
    """Exact eps-prediction of the noisy mixture: -s * grad log p_t(x)."""
    xd = x.to(F64)
    a, s = _vp(t)
    v = a * a * S0 ** 2 + s * s
    r = torch.softmax(_log_joint(xd, a, v, pi), dim=1)
    score = -(xd - a[:, None] * (r @ MEANS)) / v[:, None]
    return (-s[:, None] * score).to(x.dtype)


def eps_conditional(x, t, y):
    xd = x.to(F64)
    a, s = _vp(t)
    v = a * a * S0 ** 2 + s * s
    return (s[:, None] * (xd - a[:, None] * MEANS[y]) / v[:, None]).to(x.dtype)


def noisy_classifier(x, t):
    """Exact class posterior p(y | x_t) as logits."""
    a, s = _vp(t)
    return _log_joint(x.to(F64), a, a * a * S0 ** 2 + s * s, PI).to(x.dtype)


def nearest_component(x):
    return ((x.to(F64)[:, None, :] - MEANS[None]) ** 2).sum(-1).argmin(1)


def _schedule_abar(steps):
    ts = Schedule.ddpm(timestep_spacing="guided").timesteps(steps).astype(int)
    ab = ABAR[ts]
    return ab, np.append(ab[1:], 1.0)


def conditional_gaussian_prediction(sampler, steps, mu):
    """Mean and per-dimension variance of the output of ``sampler`` (DDIM eta=0 or DDPM fixed_small) run
    with the exact score of N(mu, S0^2) from x_T ~ N(0, 1): every step is affine in x plus Gaussian noise
    (guided-diffusion ddim_sample / p_sample formulas, written out here)."""
    ab, abp = _schedule_abar(steps)
    m, var = np.zeros(2), 1.0
    for i in range(steps):
        a, s, ap = math.sqrt(ab[i]), math.sqrt(1 - ab[i]), math.sqrt(abp[i])
        k = a * S0 ** 2 / (a * a * S0 ** 2 + s * s)            # x0^ = k x + (1 - k a) mu
        if sampler == "ddim":                                    # x' = ap x0^ + sp (x - a x0^) / s
            sp = math.sqrt(1 - abp[i])
            cx0, cx, noise = ap - sp * a / s, sp / s, 0.0
        else:                                                    # x' = c0 x0^ + ct x + sqrt(post_var) z
            beta = 1 - ab[i] / abp[i]
            cx0 = ap * beta / (1 - ab[i])
            cx = math.sqrt(1 - beta) * (1 - abp[i]) / (1 - ab[i])
            noise = beta * (1 - abp[i]) / (1 - ab[i])
        gain = cx0 * k + cx
        m = gain * m + cx0 * (1 - k * a) * mu
        var = gain * gain * var + noise
    return m, var


# ---------------------------------------------------------------------------------------------------
# ADM classifier guidance with the exact classifier at scale 1 samples the class-conditional component

@pytest.mark.parametrize("sampler,steps", [("ddpm", 250), ("ddim", 100)])
def test_adm_guidance_samples_class_conditional(sampler, steps):
    n = 6000
    y = torch.arange(n) % NCLS
    x_T = torch.randn(n, 2, generator=_gen(0))
    sch = Schedule.ddpm(timestep_spacing="guided")
    run = lambda guidance: fastguide.sample(lambda x, t, yy: eps_marginal(x, t), x_T, schedule=sch,  # noqa
                                            sampler=sampler, steps=steps, y=y, guidance=guidance,
                                            generator=_gen(1))
    out = run([fastguide.ClassifierGuidance(noisy_classifier, scale=1.0)])
    assert torch.isfinite(out).all()
    comp = nearest_component(out)
    for k in range(NCLS):
        xs = out[y == k].to(F64)
        nk = xs.shape[0]
        # membership: the components are >= 10 S0 apart, so the conditional puts ~all mass in component k
        assert (comp[y == k] == k).double().mean() >= 0.995
        pm, pv = conditional_gaussian_prediction(sampler, steps, MEANS[k].numpy())
        # the discrete sampler's own target is close to the class-conditional N(mu_k, S0^2) ...
        assert np.abs(pm - MEANS[k].numpy()).max() < 0.01 and abs(pv / S0 ** 2 - 1) < 0.08
        # ... and the samples match it: sample mean (std error sqrt(pv/n)), variance pooled over 2 dims
        # (relative std error sqrt(1/(n-1)))
        assert (xs.mean(0) - torch.tensor(pm)).abs().max() < Z * math.sqrt(pv / nk), (k, xs.mean(0), pm)
        var = xs.var(0).mean().item()
        assert abs(var / pv - 1) < Z * math.sqrt(1 / (nk - 1)), (k, var, pv)
    # the test can fail: unguided sampling gives the mixture weights, not the labels
    plain = nearest_component(run([]))
    frac = torch.bincount(plain, minlength=NCLS).double() / n
    assert (frac - PI).abs().max() < Z * math.sqrt(0.25 / n)


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance

def _cfg_model(x, t, y):
    """[uncond; cond] through one call: label NCLS is the null label (the exact marginal)."""
    cond = eps_conditional(x, t, y.clamp(max=NCLS - 1))
    return torch.where((y == NCLS)[:, None], eps_marginal(x, t), cond)


def test_cfg_scale_one_is_the_conditional_model_and_larger_scales_concentrate():
    n, steps = 3000, 100
    y = torch.arange(n) % NCLS
    x_T = torch.randn(n, 2, generator=_gen(2))
    sch = Schedule.ddpm(timestep_spacing="guided")
    cond_only = fastguide.sample(lambda x, t, yy: eps_conditional(x, t, yy), x_T, schedule=sch, sampler="ddim",
                                 steps=steps, y=y)
    spreads = []
    for w in (1.0, 2.0, 4.0):
        out = fastguide.sample(_cfg_model, x_T, schedule=sch, sampler="ddim", steps=steps, y=y,
                               guidance=[fastguide.CFG(w, null_label=NCLS)])
        if w == 1.0:
            # u + 1 * (c - u) = c: the same loop as the conditional model, to fp32 rounding
            torch.testing.assert_close(out, cond_only, rtol=1e-5, atol=1e-5)
            pm, pv = conditional_gaussian_prediction("ddim", steps, MEANS[0].numpy())
            v0 = out[y == 0].to(F64).var(0).mean().item()
            assert abs(v0 / pv - 1) < Z * math.sqrt(1 / (n // NCLS - 1))
        comp = nearest_component(out)
        assert all((comp[y == k] == k).double().mean() >= 0.995 for k in range(NCLS))
        # spread of each class around its own mean, pooled over classes and dims
        spreads.append(np.mean([out[y == k].to(F64).var(0).mean().item() for k in range(NCLS)]))
    # relative std error of each pooled spread is ~ sqrt(1/(n - 3)) ~ 1.8%; demand a much larger drop
    assert spreads[1] < 0.8 * spreads[0] and spreads[2] < 0.8 * spreads[1], spreads


# ---------------------------------------------------------------------------------------------------
# Discriminator guidance with the exact density ratio recovers the true mixture weights

PI_MODEL = torch.tensor([0.2, 0.3, 0.5], dtype=F64)   # the mis-specified model's weights
# log p / p_model lies in [log(0.2/0.5), log(0.5/0.2)] = +-0.92, far inside the DG clip (+-11.5)


def _log_ratio_vp(x, t, y=None):
    xd = x.to(F64)
    a, s = _vp(t)
    v = a * a * S0 ** 2 + s * s
    lr = torch.logsumexp(_log_joint(xd, a, v, PI), 1) - torch.logsumexp(_log_joint(xd, a, v, PI_MODEL), 1)
    return lr.to(x.dtype)


def _sigma_of_tau(tau, b0=0.1, b1=20.0):
    """The EDM sigma of the VP time tau (Kim et al.): sigma^2 = exp(b0 tau + (b1 - b0) tau^2 / 2) - 1."""
    return torch.expm1(b0 * tau + 0.5 * (b1 - b0) * tau * tau).sqrt()


def _log_ratio_edm(x_vp, tau, y=None):
    """The discriminator sees the VP view x / sqrt(1 + sigma^2) and tau; the ratio in the sigma state."""
    sig = _sigma_of_tau(tau.to(F64))
    x = x_vp.to(F64) * (1 + sig * sig).sqrt()[:, None]
    v = S0 ** 2 + sig * sig
    one = torch.ones_like(sig)
    lr = torch.logsumexp(_log_joint(x, one, v, PI), 1) - torch.logsumexp(_log_joint(x, one, v, PI_MODEL), 1)
    return lr.to(x_vp.dtype)


def _edm_denoiser(pi):
    def denoise(x, sigma, y=None):
        xd, sig = x.to(F64), sigma.to(F64)
        v = S0 ** 2 + sig * sig
        r = torch.softmax(_log_joint(xd, torch.ones_like(sig), v, pi), 1)
        score = -(xd - r @ MEANS) / v[:, None]
        return (xd + (sig * sig)[:, None] * score).to(x.dtype)
    return denoise


@pytest.mark.parametrize("sampler", ["ddim", "heun"])
def test_discriminator_guidance_recovers_true_weights(sampler):
    n = 4000
    x_T = torch.randn(n, 2, generator=_gen(3))
    if sampler == "ddim":
        sch, steps = Schedule.ddpm(timestep_spacing="guided"), 100
        model = lambda x, t, y: eps_marginal(x, t, PI_MODEL)  # noqa: E731
        disc = fastguide.DiscriminatorGuidance(_log_ratio_vp, weight=1.0)
    else:
        sch, steps = Schedule.edm(), 32
        model = _edm_denoiser(PI_MODEL)
        # weight 1 in both Heun stages makes the guided score the exact true score everywhere
        disc = fastguide.DiscriminatorGuidance(_log_ratio_edm, weight=1.0, weight2=1.0)
    run = lambda guidance: fastguide.sample(model, x_T, schedule=sch, sampler=sampler,  # noqa: E731
                                            steps=steps, guidance=guidance)
    se = Z * math.sqrt(0.25 / n)   # binomial standard error, at its largest (p = 1/2)
    plain = torch.bincount(nearest_component(run([])), minlength=NCLS).double() / n
    assert (plain - PI_MODEL).abs().max() < se, plain      # the model alone has the wrong weights
    out = run([disc])
    assert torch.isfinite(out).all()
    frac = torch.bincount(nearest_component(out), minlength=NCLS).double() / n
    assert (frac - PI).abs().max() < se, frac
    # and each component keeps its shape (mean within 4.5 standard errors plus 0.02 of discretization)
    comp = nearest_component(out)
    for k in range(NCLS):
        xs = out[comp == k].to(F64)
        assert (xs.mean(0) - MEANS[k]).abs().max() < Z * S0 / math.sqrt(xs.shape[0]) + 0.02
