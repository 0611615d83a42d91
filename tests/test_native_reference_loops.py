"""Whole loops of ``fastguide.sample`` against independent, plain re-implementations of the references.

Every reference below is written from the formulas of the named source file (never built from
``fastguide.samplers``' tables), runs in float64, and draws its noise from a generator seeded like the one
given to ``fastguide.sample``, in the same order, so the two sides see the same noise.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import fastguide
from fastguide.samplers import native as fg_samplers
from fastguide.samplers.schedule import Schedule, make_betas, space_timesteps

F64 = torch.float64
C, H, W = 2, 3, 3
B = 4
K = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _noise(shape, g):
    """The reference's noise draw: float32 standard normal from ``g`` (as fastguide draws it), then float64."""
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(F64)


def _xT(seed=0, shape=(B, C, H, W)):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float32)


def _close(fast, ref, tol=2e-4):
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast.to(F64), ref, rtol=tol, atol=tol)


def _differs(a, b, by=1e-2):
    """Guidance must visibly move the samples, else a parity check could pass with guidance ignored."""
    assert (a.to(F64) - b.to(F64)).abs().max() > by


# ---------------------------------------------------------------------------------------------------
# Analytic networks (dtype-generic, so the float64 reference and the float32 loop call the same function)

def eps_model(x, t, y=None):
    """A smooth, nonlinear eps-prediction of (x, t, y); ``t`` is the training timestep."""
    tt = (t.to(x.dtype) / 1000.0).reshape((-1,) + (1,) * (x.dim() - 1))
    out = 0.6 * torch.tanh(0.8 * x + 0.3 * tt) + 0.25 * x.roll(1, dims=1) * (1.0 - tt)
    if y is not None:
        out = out + 0.05 * y.to(x.dtype).reshape(tt.shape)
    return out


def eps_model_learned(x, t, y=None):
    """ADM-style output: eps and the learned-range interpolation value v in (-1, 1) on 2C channels."""
    tt = (t.to(x.dtype) / 1000.0).reshape((-1,) + (1,) * (x.dim() - 1))
    v = torch.tanh(0.7 * x.flip(1) + 2.0 * tt - 1.0)
    return torch.cat([eps_model(x, t, y), v], dim=1)


def edm_denoiser(x, sigma, y=None):
    """A smooth denoiser D(x; sigma): the exact one for N(0.3, 0.5^2) data plus a nonlinear term."""
    s = sigma.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
    s0 = 0.5
    exact = (s0 ** 2 * x + s ** 2 * 0.3) / (s0 ** 2 + s ** 2)
    return exact + 0.1 * torch.tanh(x.roll(1, dims=-1)) * s / (1.0 + s)


class LinearSoftmaxClassifier:
    """ADM-style noisy classifier: logits linear in x_t, modulated by the timestep it is given."""

    def __init__(self, seed=3, dim=C * H * W, k=K, time_scale=1000.0):
        g = _gen(seed)
        self.w = torch.randn(dim, k, generator=g, dtype=F64) * 0.7
        self.b = torch.randn(k, generator=g, dtype=F64)
        self.time_scale = time_scale

    def __call__(self, x, t):
        f = x.reshape(x.shape[0], -1)
        tt = t.to(x.dtype).reshape(-1, 1) / self.time_scale
        return (f @ self.w.to(x.dtype)) * (1.0 + 0.5 * tt) + self.b.to(x.dtype)


class X0Classifier:
    """An off-the-shelf-style classifier of a clean image: ignores t, softplus hidden layer."""

    def __init__(self, seed=5, dim=C * H * W, k=K, hidden=7):
        g = _gen(seed)
        self.w1 = torch.randn(dim, hidden, generator=g, dtype=F64)
        self.w2 = torch.randn(hidden, k, generator=g, dtype=F64)

    def __call__(self, x, t=None):
        f = x.reshape(x.shape[0], -1)
        return nn.functional.softplus(f @ self.w1.to(x.dtype), beta=3.0) @ self.w2.to(x.dtype)


def _labels():
    return torch.tensor([1, 3, 0, 4])[:B]


def _grad_objective(clf_logits_fn, x, y, tau1, tau2, scale=1.0):
    """scale * d/dx [tau1 * l_y - logsumexp(tau2 * l)] by autograd (tau1 = tau2 = 1: log-softmax)."""
    with torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        logits = clf_logits_fn(leaf)
        j = tau1 * logits.gather(1, y.reshape(-1, 1)).squeeze(1) - torch.logsumexp(tau2 * logits, dim=1)
        (g,) = torch.autograd.grad(j.sum(), leaf)
    return scale * g


# ---------------------------------------------------------------------------------------------------
# guided-diffusion respace.py: space_timesteps and the respaced betas

def ref_space_timesteps(num_timesteps, section_counts):
    """guided-diffusion respace.py space_timesteps (kept training timesteps as a set)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError("no integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]
    per, extra = num_timesteps // len(section_counts), num_timesteps % len(section_counts)
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = per + (1 if i < extra else 0)
        if size < count:
            raise ValueError("section too small")
        frac = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += frac
        start += size
    return set(kept)


def ref_respaced_betas(alphas_cumprod, kept):
    """guided-diffusion respace.py SpacedDiffusion.__init__: new_beta = 1 - abar_i / last_abar over kept i."""
    last, betas = 1.0, []
    for i, abar in enumerate(alphas_cumprod):
        if i in kept:
            betas.append(1.0 - abar / last)
            last = abar
    return np.array(betas)


def ref_linear_betas(n):
    """guided-diffusion gaussian_diffusion.py get_named_beta_schedule('linear')."""
    scale = 1000 / n
    return np.linspace(scale * 0.0001, scale * 0.02, n, dtype=np.float64)


def ref_cosine_betas(n):
    """guided-diffusion gaussian_diffusion.py betas_for_alpha_bar with the cosine alpha_bar, max_beta 0.999."""
    ab = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - ab((i + 1) / n) / ab(i / n), 0.999) for i in range(n)])


@pytest.mark.parametrize("spec", ["ddim50", "ddim25", "ddim1000", "250", "25", "10,15,20", "1,2,3,4",
                                  "7", "100,1", "999"])
def test_space_timesteps_matches_guided_diffusion(spec):
    assert set(space_timesteps(1000, spec)) == ref_space_timesteps(1000, spec)
    assert space_timesteps(1000, spec) == sorted(space_timesteps(1000, spec))


def test_space_timesteps_known_values_and_errors():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    kept = space_timesteps(1000, "250")
    assert kept[:4] == [0, 4, 8, 12] and kept[-2:] == [995, 999] and len(kept) == 250
    assert space_timesteps(1000, "10,15,20") == sorted(ref_space_timesteps(1000, [10, 15, 20]))
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim600")  # no integer stride gives exactly 600 steps
    with pytest.raises(ValueError):
        space_timesteps(10, "6,6")      # a section of 5 cannot take 6 steps


def test_beta_schedules_match_guided_diffusion():
    np.testing.assert_allclose(make_betas(1000, "linear", 1e-4, 0.02), ref_linear_betas(1000), rtol=1e-12)
    np.testing.assert_allclose(make_betas(400, "cosine", 0, 0), ref_cosine_betas(400), rtol=1e-12)


@pytest.mark.parametrize("spacing,steps,spec", [("guided", 25, "25"), ("guided", 250, "250"),
                                                 ("guided-ddim", 50, "ddim50"), ("guided", 7, "7")])
def test_schedule_spacing_and_respaced_betas(spacing, steps, spec):
    sch = Schedule.ddpm(timestep_spacing=spacing)
    kept = ref_space_timesteps(1000, spec)
    np.testing.assert_array_equal(sch.timesteps(steps), np.array(sorted(kept, reverse=True), dtype=np.float64))
    ref_abar = np.cumprod(1 - ref_linear_betas(1000))
    ref_b = ref_respaced_betas(ref_abar, kept)
    ts, abar, abar_prev, beta, _, _ = fg_samplers._vp_chain(sch, steps)
    np.testing.assert_allclose(beta[::-1], ref_b, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(abar[::-1], np.cumprod(1 - ref_b), rtol=1e-10)


# ---------------------------------------------------------------------------------------------------
# guided-diffusion gaussian_diffusion.py on the respaced chain (respace.py SpacedDiffusion)

class RefGaussianDiffusion:
    """guided-diffusion gaussian_diffusion.py GaussianDiffusion built with respace.py's new betas.

    The model and cond_fn see the ORIGINAL timestep (respace.py _WrappedModel, rescale_timesteps=False).
    """

    def __init__(self, kept, variance_type, num_train=1000):
        abar_train = np.cumprod(1 - ref_linear_betas(num_train))
        self.timestep_map = sorted(kept)
        b = ref_respaced_betas(abar_train, set(kept))
        self.betas = b
        self.num_timesteps = len(b)
        ac = np.cumprod(1.0 - b)
        acp = np.append(1.0, ac[:-1])
        self.ac, self.acp = ac, acp
        self.post_var = b * (1.0 - acp) / (1.0 - ac)
        self.post_logvar_clipped = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.coef1 = b * np.sqrt(acp) / (1.0 - ac)
        self.coef2 = (1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac)
        self.variance_type = variance_type
        self.fixed_large_var = np.append(self.post_var[1], b[1:])

    def orig_t(self, i, batch):
        return torch.full((batch,), float(self.timestep_map[i]), dtype=F64)

    def x0_from_eps(self, x, i, eps):
        return math.sqrt(1.0 / self.ac[i]) * x - math.sqrt(1.0 / self.ac[i] - 1.0) * eps

    def eps_from_x0(self, x, i, x0):
        return (math.sqrt(1.0 / self.ac[i]) * x - x0) / math.sqrt(1.0 / self.ac[i] - 1.0)

    def q_posterior_mean(self, x0, x, i):
        return self.coef1[i] * x0 + self.coef2[i] * x

    def p_mean_variance(self, model, x, i, clip, y):
        out = model(x, self.orig_t(i, x.shape[0]), y)
        if self.variance_type == "learned_range":
            eps, v = out.chunk(2, dim=1)
            min_log = self.post_logvar_clipped[i]
            max_log = math.log(self.betas[i])
            frac = (v + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
            var = torch.exp(log_var)
        else:
            eps = out
            if self.variance_type == "fixed_large":
                var_v, log_v = self.fixed_large_var[i], math.log(self.fixed_large_var[i])
            else:
                var_v, log_v = self.post_var[i], self.post_logvar_clipped[i]
            var = torch.full_like(x, var_v)
            log_var = torch.full_like(x, log_v)
        x0 = self.x0_from_eps(x, i, eps)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        return {"mean": self.q_posterior_mean(x0, x, i), "variance": var, "log_variance": log_var,
                "pred_xstart": x0}

    def condition_mean(self, cond_fn, out, x, i):
        return out["mean"] + out["variance"] * cond_fn(x, self.orig_t(i, x.shape[0]))

    def condition_score(self, cond_fn, out, x, i):
        eps = self.eps_from_x0(x, i, out["pred_xstart"])
        eps = eps - math.sqrt(1.0 - self.ac[i]) * cond_fn(x, self.orig_t(i, x.shape[0]))
        new = dict(out)
        new["pred_xstart"] = self.x0_from_eps(x, i, eps)
        new["mean"] = self.q_posterior_mean(new["pred_xstart"], x, i)
        return new

    def p_sample_loop(self, model, x_T, g, *, clip=False, y=None, cond_fn=None, x0_cond_fn=None,
                      gamma=0.0, max_variance=None):
        """p_sample over all steps. ``x0_cond_fn`` is EluCD's modified p_sample (DDPM/guided_diffusion)."""
        x = x_T.to(F64)
        n = self.num_timesteps
        for i in reversed(range(n)):
            out = self.p_mean_variance(model, x, i, clip, y)
            noise = _noise(x.shape, g)
            mean = out["mean"]
            if cond_fn is not None:
                mean = self.condition_mean(cond_fn, out, x, i)
            if x0_cond_fn is not None:
                # EluCD: the gradient is taken at the clipped x0^ and used as the x_t gradient;
                # add = max(sin(pi * i / N) * Sigma_max * gamma, 0), i the respaced index N-1 .. 0.
                grad = x0_cond_fn(out["pred_xstart"])
                add = max(math.sin(i / n * math.pi) * max_variance * gamma, 0.0)
                mean = mean + (out["variance"] + add) * grad
            nonzero = 0.0 if i == 0 else 1.0
            x = mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return x

    def ddim_sample_loop(self, model, x_T, g, *, clip=False, y=None, cond_fn=None, eta=0.0):
        x = x_T.to(F64)
        for i in reversed(range(self.num_timesteps)):
            out = self.p_mean_variance(model, x, i, clip, y)  # ddim_sample ignores the variance
            if cond_fn is not None:
                out = self.condition_score(cond_fn, out, x, i)
            eps = self.eps_from_x0(x, i, out["pred_xstart"])
            ab, abp = self.ac[i], self.acp[i]
            sigma = eta * math.sqrt((1 - abp) / (1 - ab)) * math.sqrt(1 - ab / abp)
            mean = out["pred_xstart"] * math.sqrt(abp) + math.sqrt(1 - abp - sigma ** 2) * eps
            if eta > 0:  # fastguide draws no noise when it would be multiplied by zero (eta = 0)
                noise = _noise(x.shape, g)
                x = mean + (0.0 if i == 0 else 1.0) * sigma * noise
            else:
                x = mean
        return x


def _adm_cond_fn(clf, y, scale):
    """guided-diffusion scripts/classifier_sample.py cond_fn: scale * grad_x log softmax(f(x, t))_y."""
    return lambda x, t: _grad_objective(lambda v: clf(v, t), x, y, 1.0, 1.0, scale)


STEPS = 20


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("guided", [False, True])
def test_ddpm_p_sample_matches_guided_diffusion(variance_type, clip, guided):
    sch = Schedule.ddpm(variance_type=variance_type, timestep_spacing="guided")
    ref = RefGaussianDiffusion(ref_space_timesteps(1000, str(STEPS)), variance_type)
    model = eps_model_learned if variance_type == "learned_range" else eps_model
    y, clf, scale = _labels(), LinearSoftmaxClassifier(), 3.0
    x_T = _xT(1)
    guidance = [fastguide.ClassifierGuidance(clf, scale=scale)] if guided else []
    fast = fastguide.sample(model, x_T, schedule=sch, sampler="ddpm", steps=STEPS, y=y, guidance=guidance,
                            generator=_gen(7), clip_denoised=(-1.0, 1.0) if clip else None)
    want = ref.p_sample_loop(model, x_T, _gen(7), clip=clip, y=y,
                             cond_fn=_adm_cond_fn(clf, y, scale) if guided else None)
    _close(fast, want)
    if guided:
        plain = ref.p_sample_loop(model, x_T, _gen(7), clip=clip, y=y)
        _differs(fast, plain)


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("guided", [False, True])
def test_ddim_sample_matches_guided_diffusion(eta, clip, guided):
    sch = Schedule.ddpm(timestep_spacing="guided-ddim")
    steps = 25
    ref = RefGaussianDiffusion(ref_space_timesteps(1000, f"ddim{steps}"), "fixed_large")
    y, clf, scale = _labels(), LinearSoftmaxClassifier(seed=11), 4.0
    x_T = _xT(2)
    guidance = [fastguide.ClassifierGuidance(clf, scale=scale)] if guided else []
    fast = fastguide.sample(eps_model, x_T, schedule=sch, sampler="ddim", steps=steps, y=y, eta=eta,
                            guidance=guidance, generator=_gen(8), clip_denoised=(-1.0, 1.0) if clip else None)
    want = ref.ddim_sample_loop(eps_model, x_T, _gen(8), clip=clip, y=y, eta=eta,
                                cond_fn=_adm_cond_fn(clf, y, scale) if guided else None)
    _close(fast, want)
    if guided:
        _differs(fast, ref.ddim_sample_loop(eps_model, x_T, _gen(8), clip=clip, y=y, eta=eta))


def test_ddim_learned_range_model_ignores_variance_channels():
    """An ADM model (2C channels) under DDIM: the variance half is unused, as in guided-diffusion."""
    sch = Schedule.ddpm(variance_type="learned_range", timestep_spacing="guided")
    ref = RefGaussianDiffusion(ref_space_timesteps(1000, "15"), "learned_range")
    x_T = _xT(3)
    fast = fastguide.sample(eps_model_learned, x_T, schedule=sch, sampler="ddim", steps=15,
                            clip_denoised=(-1, 1))
    _close(fast, ref.ddim_sample_loop(eps_model_learned, x_T, None, clip=True))


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans; diffusers: u + w (c - u), rescale_noise_cfg) in the VP loops

NULL = 9


def eps_model_learned_y(x, t, y):
    """ADM/DiT-style 2C output whose variance half depends on the label (so the cond half is visible)."""
    out = eps_model_learned(x, t, y)
    eps, v = out.chunk(2, dim=1)
    return torch.cat([eps, torch.tanh(v + 0.1 * y.to(x.dtype).reshape(-1, 1, 1, 1) - 0.5)], dim=1)


def ref_cfg(model, x, t, y, w, phi, learned):
    """diffusers pipelines: u + w (c - u) on [uncond; cond]; rescale_noise_cfg with unbiased per-sample std.
    A learned variance is the cond half's (DiT forward_with_cfg keeps each half's own; the cond half is
    the sample that is kept)."""
    u = model(x, t, torch.full_like(y, NULL))
    c = model(x, t, y)
    var_c = None
    if learned:
        (u, _), (c, var_c) = u.chunk(2, dim=1), c.chunk(2, dim=1)
    g = u + w.to(x.dtype).reshape(-1, 1, 1, 1) * (c - u)
    if phi:
        dims = list(range(1, x.dim()))
        g = phi * g * (c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True)) + (1 - phi) * g
    return g if var_c is None else torch.cat([g, var_c], dim=1)


@pytest.mark.parametrize("sampler,variance_type", [("ddim", "fixed_large"), ("ddpm", "learned_range")])
@pytest.mark.parametrize("phi", [0.0, 0.7])
def test_cfg_loop_matches_reference(sampler, variance_type, phi):
    steps = 10
    sch = Schedule.ddpm(variance_type=variance_type, timestep_spacing="guided")
    ref = RefGaussianDiffusion(ref_space_timesteps(1000, str(steps)), variance_type)
    learned = variance_type == "learned_range"
    model = eps_model_learned_y if learned else eps_model
    y, w = _labels(), torch.tensor([1.0, 2.5, 7.0, 0.0])
    start, stop = 0.2, 0.75   # CFG active on sampling steps k with start <= k / N < stop
    x_T = _xT(16)
    fast = fastguide.sample(model, x_T, schedule=sch, sampler=sampler, steps=steps, y=y, generator=_gen(20),
                            eta=0.4 if sampler == "ddim" else None,
                            guidance=[fastguide.CFG(w, rescale=phi, null_label=NULL, start=start, stop=stop)])

    def guided_model(x, t, yy):
        k = steps - 1 - ref.timestep_map.index(int(t[0]))   # sampling step counted from the noisiest
        if start <= k / steps < stop:
            return ref_cfg(model, x, t, yy, w, phi, learned)
        return model(x, t, yy)
    if sampler == "ddim":
        want = ref.ddim_sample_loop(guided_model, x_T, _gen(20), y=y, eta=0.4)
        plain = ref.ddim_sample_loop(model, x_T, _gen(20), y=y, eta=0.4)
    else:
        want = ref.p_sample_loop(guided_model, x_T, _gen(20), y=y)
        plain = ref.p_sample_loop(model, x_T, _gen(20), y=y)
    _close(fast, want)
    _differs(fast, plain)


def test_cfg_without_null_label_calls_uncond_with_y_none():
    x_T = _xT(17)
    y, w = _labels(), 3.0
    sch = Schedule.ddpm(timestep_spacing="guided")
    fast = fastguide.sample(eps_model, x_T, schedule=sch, sampler="ddim", steps=8, y=y,
                            guidance=[fastguide.CFG(w)])
    ref = RefGaussianDiffusion(ref_space_timesteps(1000, "8"), "fixed_small")
    guided = lambda x, t, yy: eps_model(x, t, None) + w * (eps_model(x, t, yy) - eps_model(x, t, None))  # noqa
    _close(fast, ref.ddim_sample_loop(guided, x_T, None, y=y))


def test_per_sample_generators_do_not_depend_on_batch_split():
    """Same seed, same samples, however the batch is split: one generator per sample."""
    sch = Schedule.ddpm(variance_type="learned_range", timestep_spacing="guided")
    y, clf = _labels(), LinearSoftmaxClassifier()
    x_T = _xT(18)
    run = lambda sl, seeds: fastguide.sample(  # noqa: E731
        eps_model_learned, x_T[sl], schedule=sch, sampler="ddpm", steps=6, y=y[sl],
        guidance=[fastguide.ClassifierGuidance(clf, scale=2.0)], generator=[_gen(s) for s in seeds])
    whole = run(slice(0, 4), [40, 41, 42, 43])
    parts = torch.cat([run(slice(0, 1), [40]), run(slice(1, 4), [41, 42, 43])])
    torch.testing.assert_close(whole, parts, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("spacing", ["trailing", "guided"])
def test_single_step_ddpm_is_the_x0_prediction(variance_type, spacing):
    """One DDPM step goes from t straight to the data: x = x0^ = (x_t - s eps) / a, no noise
    (abar_prev = 1 makes the posterior mean coefficients 1 and 0). It used to crash with a math domain
    error for learned_range (log of the zero posterior variance of a one-step chain)."""
    sch = Schedule.ddpm(variance_type=variance_type, timestep_spacing=spacing)
    model = eps_model_learned if variance_type == "learned_range" else eps_model
    x_T = _xT(20)
    t = int(sch.timesteps(1)[0])
    ab = float(np.cumprod(1 - ref_linear_betas(1000))[t])
    tt = torch.full((B,), float(t), dtype=F64)
    want = (x_T.to(F64) - math.sqrt(1 - ab) * eps_model(x_T.to(F64), tt)) / math.sqrt(ab)
    fast = fastguide.sample(model, x_T, schedule=sch, sampler="ddpm", steps=1, generator=_gen(0))
    _close(fast, want)
    guided = fastguide.sample(model, x_T, schedule=sch, sampler="ddpm", steps=1, y=_labels(),
                              guidance=[fastguide.ClassifierGuidance(LinearSoftmaxClassifier(), scale=2.0)])
    assert torch.isfinite(guided).all()


# ---------------------------------------------------------------------------------------------------
# EluCD (Ma et al.) DDPM path: DDPM/scripts/classifier_sample.py design_cond_fn + modified p_sample

@pytest.mark.parametrize("variance_type", ["learned_range", "fixed_large"])
@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_elucd_ddpm_matches_reference(variance_type, gamma):
    steps = 25
    sch = Schedule.ddpm(variance_type=variance_type, timestep_spacing="guided")
    ref = RefGaussianDiffusion(ref_space_timesteps(1000, str(steps)), variance_type)
    model = eps_model_learned if variance_type == "learned_range" else eps_model
    clf, y = X0Classifier(), _labels()
    tau1, tau2, scale = 1.0, 0.5, 2.0
    # fastguide's Sigma_max is the largest variance the run can use: for learned_range the upper end of
    # the learned range (the largest respaced beta); for fixed_large the largest fixed variance. EluCD
    # instead keeps a running max of one element ([0,0,0,0]) of the learned variance of the steps visited
    # so far, which in practice is that of the first step; we test our documented definition.
    sigma_max = float(ref.betas.max() if variance_type == "learned_range" else ref.fixed_large_var.max())
    x_T = _xT(4)
    spec = fastguide.ClassifierGuidance(clf, scale=scale, input="x0", tau1=tau1, tau2=tau2, gamma=gamma)
    fast = fastguide.sample(model, x_T, schedule=sch, sampler="ddpm", steps=steps, y=y, guidance=[spec],
                            generator=_gen(9), clip_denoised=(-1.0, 1.0))
    x0_grad = lambda x0: _grad_objective(clf, x0, y, tau1, tau2, scale)  # noqa: E731
    want = ref.p_sample_loop(model, x_T, _gen(9), clip=True, y=y, x0_cond_fn=x0_grad, gamma=gamma,
                             max_variance=sigma_max)
    _close(fast, want)
    _differs(fast, ref.p_sample_loop(model, x_T, _gen(9), clip=True, y=y))
    if gamma:
        _differs(fast, ref.p_sample_loop(model, x_T, _gen(9), clip=True, y=y, x0_cond_fn=x0_grad,
                                         gamma=0.0, max_variance=sigma_max), by=1e-3)


@pytest.mark.parametrize("extra", ["x0_gamma0", "adm"])
def test_elucd_ddpm_gamma_term_only_scales_its_own_gradient(extra):
    """EluCD's extra variance gamma * Sigma_max * sin(pi i/N) belongs to the x0 classifier that asked for it;
    a second mean-shift gradient in the same loop (another x0 classifier with gamma = 0, or ADM on x_t) is
    shifted by Sigma_t only (guided-diffusion condition_mean)."""
    steps = 20
    sch = Schedule.ddpm(variance_type="fixed_large", timestep_spacing="guided")
    ref = RefGaussianDiffusion(ref_space_timesteps(1000, str(steps)), "fixed_large")
    clf, clf2, y = X0Classifier(seed=31), X0Classifier(seed=32), _labels()
    adm = LinearSoftmaxClassifier(seed=33)
    gamma, sigma_max = 0.3, float(ref.fixed_large_var.max())
    spec = fastguide.ClassifierGuidance(clf, scale=2.0, input="x0", tau1=1.0, tau2=0.5, gamma=gamma)
    if extra == "x0_gamma0":
        other = fastguide.ClassifierGuidance(clf2, scale=3.0, input="x0", tau1=1.0, tau2=1.0)
        # a second x0 gradient without gamma: its shift is Sigma_t * g2, folded into cond_fn-free form below
        other_grad = lambda x0: _grad_objective(clf2, x0, y, 1.0, 1.0, 3.0)  # noqa: E731
    else:
        other = fastguide.ClassifierGuidance(adm, scale=2.0)
    x_T = _xT(15)
    fast = fastguide.sample(eps_model, x_T, schedule=sch, sampler="ddpm", steps=steps, y=y,
                            guidance=[spec, other], generator=_gen(19), clip_denoised=(-1.0, 1.0))

    # reference: p_sample with condition_mean for the plain term(s) and EluCD's shift for the gamma term
    x, n = x_T.to(F64), ref.num_timesteps
    g = _gen(19)
    for i in reversed(range(n)):
        out = ref.p_mean_variance(eps_model, x, i, True, y)
        noise = _noise(x.shape, g)
        mean = out["mean"]
        if extra == "x0_gamma0":
            mean = mean + out["variance"] * other_grad(out["pred_xstart"])
        else:
            mean = ref.condition_mean(_adm_cond_fn(adm, y, 2.0), out, x, i)
        add = max(math.sin(i / n * math.pi) * sigma_max * gamma, 0.0)
        mean = mean + (out["variance"] + add) * _grad_objective(clf, out["pred_xstart"], y, 1.0, 0.5, 2.0)
        x = mean + (0.0 if i == 0 else 1.0) * torch.exp(0.5 * out["log_variance"]) * noise
    _close(fast, x)


# ---------------------------------------------------------------------------------------------------
# DG (Kim et al.) DDPM path: DG_imagenet sample.py cond_fn through guided-diffusion condition_mean

class LogitDiscriminator:
    """An analytic discriminator logit of (x, t); ``offset`` pushes chosen samples past the DG clip."""

    def __init__(self, seed=13, dim=C * H * W, time_scale=1000.0, offset=None):
        g = _gen(seed)
        self.u = torch.randn(dim, generator=g, dtype=F64) * 0.6
        self.time_scale = time_scale
        self.offset = offset

    def __call__(self, x, t, y=None):
        f = x.reshape(x.shape[0], -1)
        tt = t.to(x.dtype) / self.time_scale
        logit = (f @ self.u.to(x.dtype)) * (1.0 + tt) + 0.3 * torch.tanh(f).sum(1)
        if self.offset is not None:
            logit = logit + self.offset.to(x.dtype)
        return logit


def _dg_log_ratio_grad(disc, x, t, y, scale=1.0):
    """grad_x [log d - log(1 - d)], d = sigmoid(logit) clipped to [1e-5, 1 - 1e-5] (DG classifier_lib)."""
    with torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        d = torch.sigmoid(disc(leaf, t, y)).clamp(1e-5, 1.0 - 1e-5)
        (g,) = torch.autograd.grad((torch.log(d) - torch.log(1.0 - d)).sum(), leaf)
    return scale * g


def test_dg_ddpm_mean_shift_with_window():
    steps = 50
    sch = Schedule.ddpm(variance_type="learned_range", timestep_spacing="guided-ddim")
    ref = RefGaussianDiffusion(ref_space_timesteps(1000, f"ddim{steps}"), "learned_range")
    assert 100 in ref.timestep_map and 120 in ref.timestep_map  # the window edge is exercised
    disc, y, w = LogitDiscriminator(), _labels(), 1.5
    x_T = _xT(5)
    spec = fastguide.DiscriminatorGuidance(disc, weight=w, t_min=0.101)
    fast = fastguide.sample(eps_model_learned, x_T, schedule=sch, sampler="ddpm", steps=steps, y=y,
                            guidance=[spec], generator=_gen(10))

    def cond_fn(x, t):  # DG_imagenet: zero unless t[0] > time_min = 100 (original timestep)
        if t[0] > 100:
            return _dg_log_ratio_grad(disc, x, t, y, w)
        return torch.zeros_like(x)

    want = ref.p_sample_loop(eps_model_learned, x_T, _gen(10), y=y, cond_fn=cond_fn)
    _close(fast, want)
    _differs(fast, ref.p_sample_loop(eps_model_learned, x_T, _gen(10), y=y))


# ---------------------------------------------------------------------------------------------------
# Sigma samplers: EDM generate.py edm_sampler (Karras et al. 2022 Alg. 2) and k-diffusion sampling.py

def ref_karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """k-diffusion get_sigmas_karras / EDM t_steps, with the final 0 appended."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return np.append((hi + ramp * (lo - hi)) ** rho, 0.0)


def ref_edm_sampler(denoise, x_T, sigmas, g, *, heun=True, s_churn=0.0, s_min=0.0, s_max=float("inf"),
                    s_noise=1.0, init_scale=None, pre_shift=None, dg=None):
    """EDM generate.py edm_sampler (Heun) / k-diffusion sample_euler (heun=False).

    ``denoise(x, i_sigma, stage)`` returns D. ``pre_shift(x_cur, i)`` is EluCD's displacement added to
    x_hat (EDM/generate.py); ``dg(x, sigma, stage)`` returns DG's ``dg`` term with
    ``d += w * dg / sigma`` (DG generate.py). Churn noise is drawn only when gamma > 0, as fastguide does
    (EDM draws it every step, k-diffusion only when gamma > 0).
    """
    n = len(sigmas) - 1
    x = x_T.to(F64) * (sigmas[0] if init_scale is None else init_scale)
    for i in range(n):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_churn > 0 and s_min <= t_cur <= s_max else 0.0
        t_hat = t_cur * (1 + gamma)
        x_hat = x
        if pre_shift is not None:
            x_hat = x_hat + pre_shift(x, i)
        if gamma > 0:
            x_hat = x_hat + math.sqrt(t_hat ** 2 - t_cur ** 2) * s_noise * _noise(x.shape, g)
        d_cur = (x_hat - denoise(x_hat, t_hat, 1)) / t_hat
        if dg is not None:
            d_cur = d_cur + dg(x_hat, t_hat, 1) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if heun and i < n - 1:
            d_prime = (x_next - denoise(x_next, t_next, 2)) / t_next
            if dg is not None:
                d_prime = d_prime + dg(x_next, t_next, 2) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        x = x_next
    return x


def ref_euler_ancestral(denoise, x_T, sigmas, g, eta=1.0, s_noise=1.0, init_scale=None):
    """k-diffusion sampling.py sample_euler_ancestral with get_ancestral_step."""
    x = x_T.to(F64) * (sigmas[0] if init_scale is None else init_scale)
    for i in range(len(sigmas) - 1):
        s, s_to = sigmas[i], sigmas[i + 1]
        den = denoise(x, s, 1)
        up = min(s_to, eta * math.sqrt(s_to ** 2 * (s ** 2 - s_to ** 2) / s ** 2))
        down = math.sqrt(s_to ** 2 - up ** 2)
        x = x + (x - den) / s * (down - s)
        if s_to > 0:
            x = x + _noise(x.shape, g) * s_noise * up
    return x


def ref_dpmpp_2m(denoise, x_T, sigmas, init_scale=None):
    """k-diffusion sampling.py sample_dpmpp_2m (t = -log sigma)."""
    x = x_T.to(F64) * (sigmas[0] if init_scale is None else init_scale)
    old = None
    for i in range(len(sigmas) - 1):
        den = denoise(x, sigmas[i], 1)
        t, t_next = -math.log(sigmas[i]), (-math.log(sigmas[i + 1]) if sigmas[i + 1] > 0 else math.inf)
        h = t_next - t
        ratio = sigmas[i + 1] / sigmas[i]
        if old is None or sigmas[i + 1] == 0:
            x = ratio * x - math.expm1(-h) * den  # h = inf on the last step: x = denoised
        else:
            h_last = t - (-math.log(sigmas[i - 1]))
            r = h_last / h
            d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            x = ratio * x - math.expm1(-h) * d
        old = den
    return x


def _edm_denoise(y=None):
    return lambda x, sigma, stage: edm_denoiser(x, torch.full((x.shape[0],), sigma, dtype=F64), y)


EDM_STEPS = 8


@pytest.mark.parametrize("churn", [0.0, 30.0])
def test_edm_heun_matches_edm_sampler(churn):
    sch = Schedule.edm()
    sig = ref_karras_sigmas(EDM_STEPS)
    x_T = _xT(6)
    opts = dict(s_churn=churn, s_tmin=0.05, s_tmax=20.0) if churn else {}
    fast = fastguide.sample(edm_denoiser, x_T, schedule=sch, sampler="heun", steps=EDM_STEPS, generator=_gen(11),
                            **opts)
    want = ref_edm_sampler(_edm_denoise(), x_T, sig, _gen(11), s_churn=churn, s_min=0.05, s_max=20.0)
    _close(fast, want)
    if churn:  # some steps churn and some do not (S_min / S_max), so the draw order is exercised
        assert any(0.05 <= s <= 20.0 for s in sig[:-1]) and not all(0.05 <= s <= 20.0 for s in sig[:-1])
        _differs(fast, ref_edm_sampler(_edm_denoise(), x_T, sig, None))


@pytest.mark.parametrize("churn", [0.0, 10.0])
def test_edm_euler_matches_k_diffusion(churn):
    sig = ref_karras_sigmas(EDM_STEPS)
    x_T = _xT(7)
    fast = fastguide.sample(edm_denoiser, x_T, schedule=Schedule.edm(), sampler="euler", steps=EDM_STEPS,
                            generator=_gen(12), s_churn=churn)
    _close(fast, ref_edm_sampler(_edm_denoise(), x_T, sig, _gen(12), heun=False, s_churn=churn))


def test_edm_euler_ancestral_matches_k_diffusion():
    sig = ref_karras_sigmas(EDM_STEPS)
    x_T = _xT(8)
    fast = fastguide.sample(edm_denoiser, x_T, schedule=Schedule.edm(), sampler="euler_ancestral",
                            steps=EDM_STEPS, generator=_gen(13))
    _close(fast, ref_euler_ancestral(_edm_denoise(), x_T, sig, _gen(13)))
    fast_half = fastguide.sample(edm_denoiser, x_T, schedule=Schedule.edm(), sampler="euler_ancestral",
                                 steps=EDM_STEPS, generator=_gen(13), eta=0.5)
    _close(fast_half, ref_euler_ancestral(_edm_denoise(), x_T, sig, _gen(13), eta=0.5))


def test_edm_dpmpp_2m_matches_k_diffusion():
    sig = ref_karras_sigmas(EDM_STEPS)
    x_T = _xT(9)
    fast = fastguide.sample(edm_denoiser, x_T, schedule=Schedule.edm(), sampler="dpmpp_2m", steps=EDM_STEPS)
    _close(fast, ref_dpmpp_2m(_edm_denoise(), x_T, sig))


def test_edm_epsilon_prediction_matches_denoiser():
    """An EDM schedule with an eps model: eps = (x - D) / sigma is the same sampler."""
    x_T = _xT(10)
    eps_fn = lambda x, s, y=None: (x - edm_denoiser(x, s, y)) / s.to(x.dtype).reshape(-1, 1, 1, 1)  # noqa
    for sampler in ("heun", "dpmpp_2m", "euler"):
        a = fastguide.sample(edm_denoiser, x_T, schedule=Schedule.edm(), sampler=sampler, steps=6)
        b = fastguide.sample(eps_fn, x_T, schedule=Schedule.edm(prediction_type="epsilon"), sampler=sampler,
                             steps=6)
        _close(b, a.to(F64), tol=1e-4)


# ---- sigma samplers on a VP schedule (k-diffusion DiscreteEpsDDPMDenoiser: c_in = 1/sqrt(1+sigma^2))

def ref_vp_timesteps(spacing, steps, T=1000, offset=0):
    """diffusers set_timesteps: 'leading' and 'trailing' spacings (integer training timesteps)."""
    if spacing == "leading":
        ratio = T // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + offset
    return np.round(np.arange(T, 0, -T / steps)) - 1


def _vp_sigma_denoise(abar_train, ts, model, y=None):
    """k-diffusion DiscreteEpsDDPMDenoiser: D = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma))."""
    sig_of_t = {float(np.sqrt((1 - abar_train[int(t)]) / abar_train[int(t)])): float(t) for t in ts}

    def denoise(x, sigma, stage):
        t = sig_of_t[float(sigma)]
        eps = model(x / math.sqrt(1 + sigma ** 2), torch.full((x.shape[0],), t, dtype=F64), y)
        return x - sigma * eps
    return denoise


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "heun"])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_sigma_samplers_on_vp_schedule(sampler, spacing):
    steps = 8
    offset = 1 if spacing == "leading" else 0
    sch = Schedule.ddpm(timestep_spacing=spacing, steps_offset=offset)
    abar = np.cumprod(1 - ref_linear_betas(1000))
    ts = ref_vp_timesteps(spacing, steps, offset=offset)
    sig = np.append(np.sqrt((1 - abar[ts.astype(int)]) / abar[ts.astype(int)]), 0.0)
    # The unit-Gaussian x_T is the VP x_T: in the sigma state it is x_T * sqrt(1 + sigma_max^2)
    # (diffusers' init_noise_sigma for 'leading'; k-diffusion would start from sigma_max * x_T).
    init = math.sqrt(1 + sig[0] ** 2)
    den = _vp_sigma_denoise(abar, ts, eps_model)
    x_T = _xT(11)
    fast = fastguide.sample(eps_model, x_T, schedule=sch, sampler=sampler, steps=steps, generator=_gen(14))
    if sampler == "euler":
        want = ref_edm_sampler(den, x_T, sig, None, heun=False, init_scale=init)
    elif sampler == "heun":
        want = ref_edm_sampler(den, x_T, sig, None, heun=True, init_scale=init)
    elif sampler == "dpmpp_2m":
        want = ref_dpmpp_2m(den, x_T, sig, init_scale=init)
    else:
        want = ref_euler_ancestral(den, x_T, sig, _gen(14), init_scale=init)
    _close(fast, want)


def test_score_guidance_on_sigma_sampler_vp_schedule():
    """ADM classifier + DG discriminator on Euler ancestral over a VP schedule: the guided denoiser is
    D' = D + sigma^2 grad_x [log p(y | x_vp, t) + w log(d / (1 - d))(x_vp, t)], both networks seeing the VP
    view x_vp = x / sqrt(1 + sigma^2) and the training timestep (k-diffusion-style score guidance)."""
    steps = 8
    sch = Schedule.ddpm(timestep_spacing="trailing")
    abar = np.cumprod(1 - ref_linear_betas(1000))
    ts = ref_vp_timesteps("trailing", steps)
    sig = np.append(np.sqrt((1 - abar[ts.astype(int)]) / abar[ts.astype(int)]), 0.0)
    y, clf, disc, w = _labels(), LinearSoftmaxClassifier(seed=41), LogitDiscriminator(seed=42), 1.5
    base = _vp_sigma_denoise(abar, ts, eps_model, y)
    t_of = {float(s): float(t) for s, t in zip(sig[:-1], ts)}

    def guided(x, sigma, stage):
        t = torch.full((x.shape[0],), t_of[float(sigma)], dtype=F64)
        c = 1 / math.sqrt(1 + sigma ** 2)
        g = c * _grad_objective(lambda v: clf(v, t), c * x, y, 1.0, 1.0)     # chain rule through x_vp
        g = g + c * _dg_log_ratio_grad(disc, c * x, t, y, w)
        return base(x, sigma, stage) + sigma ** 2 * g
    init = math.sqrt(1 + sig[0] ** 2)
    x_T = _xT(19)
    fast = fastguide.sample(eps_model, x_T, schedule=sch, sampler="euler_ancestral", steps=steps, y=y,
                            generator=_gen(21), guidance=[fastguide.ClassifierGuidance(clf),
                                                          fastguide.DiscriminatorGuidance(disc, weight=w)])
    _close(fast, ref_euler_ancestral(guided, x_T, sig, _gen(21), init_scale=init))
    _differs(fast, ref_euler_ancestral(base, x_T, sig, _gen(21), init_scale=init))


# ---- heun on a VP schedule: k-diffusion sample_heun with a VP denoiser wrapper (diffusers' HeunDiscreteScheduler),
# written from the formulas: sigma(t) = sqrt((1 - abar_t) / abar_t), linear in t between training timesteps
# (diffusers), and t(sigma) by interpolating log sigma (k-diffusion DiscreteSchedule.sigma_to_t, clamped).

def ref_sigma_of_t(abar_train, ts):
    """diffusers set_timesteps: np.interp of the training sigmas at (fractional) timesteps, written out."""
    sig = np.sqrt((1 - abar_train) / abar_train)
    out = []
    for t in ts:
        lo = min(int(math.floor(t)), len(sig) - 2)
        w = t - lo
        out.append((1 - w) * sig[lo] + w * sig[lo + 1])
    return np.array(out)


def ref_t_of_sigma(abar_train, sigma):
    """k-diffusion DiscreteSchedule.sigma_to_t: the fractional training timestep of ``sigma``."""
    log_sigmas = np.log(np.sqrt((1 - abar_train) / abar_train))
    log_sigma = math.log(sigma)
    low_idx = min(int(np.cumsum(log_sigma - log_sigmas >= 0).argmax()), len(log_sigmas) - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = min(max((low - log_sigma) / (low - high), 0.0), 1.0)
    return (1 - w) * low_idx + w * (low_idx + 1)


def ref_vp_denoiser(model, prediction_type, calls, y=None):
    """k-diffusion DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser: the VP model sees the VP view
    x_vp = x / sqrt(1 + sigma^2) = a x0 + s eps (a = c_in, s = sigma c_in) and its training timestep t."""
    def denoise(x, sigma, t):
        calls.append(float(t))
        c_in = 1 / math.sqrt(1 + sigma ** 2)
        out = model(x * c_in, torch.full((x.shape[0],), t, dtype=F64), y)
        if prediction_type == "epsilon":
            return x - sigma * out                       # x0 = x - sigma eps
        return c_in * (c_in * x) - sigma * c_in * out    # x0 = a x_vp - s v
    return denoise


def ref_vp_heun(denoise, x_T, sigmas, ts, abar_train, g, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                s_noise=1.0):
    """k-diffusion sampling.py sample_heun (EDM Alg. 2) on the sigma state x = x0 + sigma eps of a VP model,
    starting from the VP x_T (x_T * sqrt(1 + sigma_max^2)); a churned sigma_hat's timestep is t(sigma_hat)."""
    n = len(ts)
    sig = list(sigmas) + [0.0]
    x = x_T.to(F64) * math.sqrt(1 + sig[0] ** 2)
    for i in range(n):
        s_cur, s_next = sig[i], sig[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_churn > 0 and s_tmin <= s_cur <= s_tmax else 0.0
        s_hat, t_hat = s_cur * (1 + gamma), ts[i]
        if gamma > 0:
            x = x + math.sqrt(s_hat ** 2 - s_cur ** 2) * s_noise * _noise(x.shape, g)
            t_hat = ref_t_of_sigma(abar_train, s_hat)
        d = (x - denoise(x, s_hat, t_hat)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next > 0:  # Heun's correction, except on the step to sigma = 0 (Euler)
            d_2 = (x_next - denoise(x_next, s_next, ts[i + 1])) / s_next
            x_next = x + (s_next - s_hat) * (d + d_2) / 2
        x = x_next
    return x


@pytest.mark.parametrize("prediction_type,karras,churn", [
    ("epsilon", False, {}),
    ("v_prediction", False, {}),
    ("epsilon", True, {}),
    ("epsilon", False, dict(s_churn=4.0, s_tmin=0.5, s_tmax=50.0, s_noise=1.007)),   # some steps churn
    ("v_prediction", True, dict(s_churn=4.0, s_tmin=0.5, s_tmax=50.0)),
    ("epsilon", False, dict(s_churn=4.0)),   # the first step churns above the largest training sigma: t clamps
])
def test_heun_on_vp_schedule_matches_reference(prediction_type, karras, churn):
    """``sampler="heun"`` on ``Schedule.ddpm`` against a float64 Heun written from k-diffusion's sample_heun and
    its VP wrappers: linspace (fractional) timesteps or Karras sigmas, eps and v, with and without churn; the
    model's timesteps are compared too (2 N - 1 calls, plus none extra for churn)."""
    steps = 8
    sch = Schedule.ddpm(prediction_type=prediction_type, timestep_spacing="linspace", use_karras_sigmas=karras)
    abar = np.cumprod(1 - ref_linear_betas(1000))
    ts = np.linspace(0, 999, steps)[::-1]
    sig = ref_sigma_of_t(abar, ts)
    if karras:
        sig = ref_karras_sigmas(steps, sigma_min=sig[-1], sigma_max=sig[0])[:-1]
        ts = np.array([ref_t_of_sigma(abar, s) for s in sig])
    if churn.get("s_tmax", math.inf) < math.inf:
        assert any(0.5 <= s <= 50.0 for s in sig) and not all(0.5 <= s <= 50.0 for s in sig)
    fast_calls, ref_calls = [], []

    def recording(x, t, y=None):
        fast_calls.append(float(t[0]))
        return eps_model(x, t, y)
    x_T = _xT(23)
    fast = fastguide.sample(recording, x_T, schedule=sch, sampler="heun", steps=steps, generator=_gen(24), **churn)
    want = ref_vp_heun(ref_vp_denoiser(eps_model, prediction_type, ref_calls), x_T, sig, ts, abar, _gen(24),
                       **churn)
    _close(fast, want)
    assert len(fast_calls) == len(ref_calls) == 2 * steps - 1
    np.testing.assert_allclose(fast_calls, ref_calls, rtol=1e-6, atol=1e-3)  # the model's t are fp32
    if churn:
        _differs(fast, ref_vp_heun(ref_vp_denoiser(eps_model, prediction_type, []), x_T, sig, ts, abar, None))


# ---------------------------------------------------------------------------------------------------
# Prediction types: one exact denoiser expressed as eps, v and x0 gives the same samples

S0, MU = 0.6, 0.2


def _exact_x0(x, t):
    """E[x0 | x_t] for x0 ~ N(MU, S0^2) elementwise on the linear-1000 VP schedule."""
    abar = torch.as_tensor(np.cumprod(1 - ref_linear_betas(1000)), dtype=x.dtype)
    tt = t.to(x.dtype)
    # fractional t (not used by these samplers) would need interpolation; the samplers here use integers
    ab = abar[tt.round().long()].reshape(-1, *([1] * (x.dim() - 1)))
    a, s = ab.sqrt(), (1 - ab).sqrt()
    return MU + a * S0 ** 2 / (a * a * S0 ** 2 + s * s) * (x - a * MU), a, s


def _as_eps(x, t, y=None):
    x0, a, s = _exact_x0(x, t)
    return (x - a * x0) / s


def _as_v(x, t, y=None):
    x0, a, s = _exact_x0(x, t)
    return a * (x - a * x0) / s - s * x0


def _as_x0(x, t, y=None):
    return _exact_x0(x, t)[0]


@pytest.mark.parametrize("sampler,opts", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("ddim", {}), ("euler", {}),
                                          ("dpmpp_2m", {}), ("heun", {}), ("euler_ancestral", {})])
def test_prediction_types_are_equivalent(sampler, opts):
    x_T = _xT(12)
    outs = []
    for pred, fn in (("epsilon", _as_eps), ("v_prediction", _as_v), ("sample", _as_x0)):
        sch = Schedule.ddpm(prediction_type=pred, timestep_spacing="trailing")
        outs.append(fastguide.sample(fn, x_T, schedule=sch, sampler=sampler, steps=10, generator=_gen(15),
                                     **opts))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-4, atol=1e-4)
    # and the eps loop is the exact-denoiser sampler itself (ddim eta=0 against guided-diffusion)
    if sampler == "ddim" and not opts:
        sch = Schedule.ddpm(timestep_spacing="trailing")
        ts = sch.timesteps(10)
        ref = RefGaussianDiffusion(set(int(t) for t in ts), "fixed_small")
        _close(outs[0], ref.ddim_sample_loop(_as_eps, x_T, None))


# ---------------------------------------------------------------------------------------------------
# EluCD EDM recipe: EDM/generate.py edm_sampler with the classifier displacement of x_hat

def ref_elucd_shift(clf, y, tau1, tau2, g_max, add, n, scale=1.0):
    """EluCD EDM/generate.py: classifier on x_cur / max(1, rms), grad / rms(grad) * rms(x_cur) * w_i."""
    def shift(x_cur, i):
        rms = x_cur.pow(2).mean(dim=(1, 2, 3)).sqrt()
        x0 = torch.where((rms > 1).reshape(-1, 1, 1, 1), x_cur / rms.reshape(-1, 1, 1, 1), x_cur)
        grads = _grad_objective(clf, x0, y, tau1, tau2)
        length = n + 1  # len(t_steps)
        w = max(g_max / length * (length - i), 1e-5)
        w += math.sin(i / (length - 1) * math.pi) * g_max * add
        g_rms = grads.pow(2).mean(dim=(1, 2, 3)).sqrt()
        return grads / g_rms.reshape(-1, 1, 1, 1) * rms.reshape(-1, 1, 1, 1) * (w * scale)
    return shift


@pytest.mark.parametrize("churn", [0.0, 20.0])
def test_elucd_edm_recipe_matches_reference(churn):
    n = 8
    clf, y = X0Classifier(seed=21), _labels()
    tau1, tau2, g_max, add = 1.0, 0.5, 0.3, 0.3
    x_T = _xT(13)
    spec = fastguide.ClassifierGuidance(clf, input="x0", tau1=tau1, tau2=tau2, g_max=g_max, add=add)
    fast = fastguide.sample(edm_denoiser, x_T, schedule=Schedule.edm(), sampler="heun", steps=n, y=y,
                            guidance=[spec], generator=_gen(16), s_churn=churn)
    sig = ref_karras_sigmas(n)
    shift = ref_elucd_shift(clf, y, tau1, tau2, g_max, add, n)
    seen = []

    def recording_shift(x_cur, i):
        seen.append(x_cur.pow(2).mean(dim=(1, 2, 3)).sqrt())
        return shift(x_cur, i)
    want = ref_edm_sampler(_edm_denoise(y), x_T, sig, _gen(16), s_churn=churn, pre_shift=recording_shift)
    _close(fast, want)
    _differs(fast, ref_edm_sampler(_edm_denoise(y), x_T, sig, _gen(16), s_churn=churn))
    # both branches of x / max(1, rms(x)) are exercised: rms >> 1 at the start, rms < 1 for some later
    seen = torch.stack(seen)
    assert seen.max() > 1.0 and seen.min() < 1.0


# ---------------------------------------------------------------------------------------------------
# DG EDM Heun: DG generate.py edm_sampler + classifier_lib.get_grad_log_ratio

def ref_compute_tau(sigma, b0=0.1, b1=20.0):
    """DG classifier_lib vpsde.compute_tau."""
    return (-b0 + math.sqrt(b0 ** 2 + 2 * (b1 - b0) * math.log(1 + sigma ** 2))) / (b1 - b0)


def ref_mean_vp_tau(tau, b0=0.1, b1=20.0):
    """DG classifier_lib vpsde.compute_vpsde_mean ... exp(-0.25 tau^2 (b1 - b0) - 0.5 tau b0)."""
    return math.exp(-0.25 * tau ** 2 * (b1 - b0) - 0.5 * tau * b0)


def ref_dg_term(disc, y, w1, w2, time_min, time_max):
    """DG get_grad_log_ratio times the stage weight: dg = -(sigma^2 * mean_vp_tau) * grad_input log ratio."""
    def dg(x, sigma, stage):
        w = w1 if stage == 1 else w2
        tau = ref_compute_tau(sigma)
        if w == 0 or tau > time_max or tau < time_min:
            return torch.zeros_like(x)
        m = ref_mean_vp_tau(tau)
        t = torch.full((x.shape[0],), tau, dtype=F64)
        g = _dg_log_ratio_grad(disc, m * x, t, y)  # gradient w.r.t. the discriminator input
        return -w * (sigma ** 2 * m) * g
    return dg


@pytest.mark.parametrize("w2,window,churn", [(0.0, (0.0, 1.0), 0.0), (0.5, (0.3, 0.9), 0.0),
                                             (1.0, (0.01, 1.0), 15.0)])
def test_dg_edm_heun_matches_reference(w2, window, churn):
    n = 10
    y = _labels()
    # sample 2 is pushed far past the DG clip: its d is clipped, so its guidance gradient is zero
    offset = torch.tensor([0.0, 0.0, 40.0, 0.0], dtype=F64)
    disc = LogitDiscriminator(seed=17, time_scale=1.0, offset=offset)
    x_T = _xT(14)
    spec = fastguide.DiscriminatorGuidance(disc, weight=2.0, weight2=w2, t_min=window[0], t_max=window[1])
    fast = fastguide.sample(edm_denoiser, x_T, schedule=Schedule.edm(), sampler="heun", steps=n, y=y,
                            guidance=[spec], s_churn=churn, generator=_gen(22))
    sig = ref_karras_sigmas(n)
    taus = [ref_compute_tau(s) for s in sig[:-1]]
    if window[0] > 0.01:
        assert any(window[0] <= t <= window[1] for t in taus) and not all(window[0] <= t <= window[1] for t in taus)
    want = ref_edm_sampler(_edm_denoise(y), x_T, sig, _gen(22), s_churn=churn,
                           dg=ref_dg_term(disc, y, 2.0, w2, *window))
    _close(fast, want)
    plain = ref_edm_sampler(_edm_denoise(y), x_T, sig, _gen(22), s_churn=churn)
    _differs(fast, plain)
    _close(fast[2], plain[2])  # the clipped sample is unguided


# ---------------------------------------------------------------------------------------------------
# temperature log-sum-exp gradient and smooth()

def _ref_lse_grad(logits, y, tau1, tau2, scale=None):
    """autograd of tau1 * l_y - logsumexp(tau2 * l) w.r.t. l, in float64 (EluCD design_cond_fn objective)."""
    leaf = logits.detach().to(F64).requires_grad_(True)
    j = tau1 * leaf.gather(1, y.reshape(-1, 1)).squeeze(1) - torch.logsumexp(tau2 * leaf, dim=1)
    (g,) = torch.autograd.grad(j.sum(), leaf)
    return g if scale is None else g * scale.to(F64).reshape(-1, 1)


@pytest.mark.parametrize("tau1,tau2", [(1.0, 1.0), (1.0, 0.5), (2.0, 0.0), (0.7, 3.0)])
def test_temperature_lse_grad_matches_autograd(tau1, tau2):
    g = _gen(20)
    logits = torch.randn(6, 11, generator=g) * 4
    y = torch.randint(0, 11, (6,), generator=g)
    scale = torch.rand(6, generator=g) * 2
    got = fastguide.temperature_lse_grad(logits, y, tau1, tau2)
    torch.testing.assert_close(got.to(F64), _ref_lse_grad(logits, y, tau1, tau2), rtol=1e-5, atol=1e-6)
    got = fastguide.temperature_lse_grad(logits, y, tau1, tau2, scale=scale)
    torch.testing.assert_close(got.to(F64), _ref_lse_grad(logits, y, tau1, tau2, scale), rtol=1e-5, atol=1e-6)


def test_temperature_lse_grad_large_k_and_fp16_extremes():
    g = _gen(21)
    k = 21843
    logits = torch.randn(3, k, generator=g) * 10
    y = torch.tensor([0, 12345, k - 1])
    got = fastguide.temperature_lse_grad(logits, y, 1.0, 0.5)
    torch.testing.assert_close(got.to(F64), _ref_lse_grad(logits, y, 1.0, 0.5), rtol=1e-5, atol=1e-7)
    # fp16 logits of magnitude 6e4: a naive exp overflows; the gradient must stay finite and right
    big = (torch.randn(3, k, generator=g) * 3e4).clamp(-6e4, 6e4)
    big[:, 7] = 6e4
    big[1, 12345] = -6e4
    big16 = big.half()
    got16 = fastguide.temperature_lse_grad(big16, y, 1.0, 0.5)
    assert torch.isfinite(got16).all()
    torch.testing.assert_close(got16.to(F64), _ref_lse_grad(big16.float(), y, 1.0, 0.5), rtol=1e-2, atol=1e-3)
    gotbf = fastguide.temperature_lse_grad(big.bfloat16(), y, 1.0, 1.0)
    assert torch.isfinite(gotbf).all()
    torch.testing.assert_close(gotbf.to(F64), _ref_lse_grad(big.bfloat16().float(), y, 1.0, 1.0), rtol=2e-2,
                               atol=2e-2)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = nn.Linear(4, 4)
        self.lin2 = nn.Linear(4, 4)
        self.relu = nn.ReLU()  # shared, used twice (like torchvision's Bottleneck)

    def forward(self, x):
        return self.relu(self.lin2(self.relu(self.lin1(x))))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.layers = nn.ModuleList([_Block(), nn.Sequential(_Block(), nn.ReLU(inplace=True))])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_smooth_replaces_nested_relus_and_keeps_original():
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(5, 3)
    before = net(x).detach().clone()
    sm = fastguide.smooth(net, 3.0)
    assert sum(isinstance(m, nn.ReLU) for m in sm.modules()) == 0
    softplus = [m for m in sm.modules() if isinstance(m, nn.Softplus)]
    assert len(softplus) == 4 and all(m.beta == 3.0 for m in softplus)
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 4  # original untouched
    torch.testing.assert_close(net(x), before)

    def manual(x):  # the same network with softplus(beta=3) written out
        act = lambda v: nn.functional.softplus(v, beta=3.0)  # noqa: E731
        x = act(net.stem[0](x))
        for blk in (net.layers[0], net.layers[1][0]):
            x = act(blk.lin2(act(blk.lin1(x))))
        x = act(x)
        return net.head(x)
    torch.testing.assert_close(sm(x), manual(x))
    # weights are copies, not shared
    assert sm.head.weight.data_ptr() != net.head.weight.data_ptr()


# ---------------------------------------------------------------------------------------------------
# fastguide.guided_step reads a fastguide.samplers.Plan as its table

def test_guided_step_accepts_a_plan_as_table():
    """A ``Plan`` (what ``fastguide.samplers.build`` returns) works as ``table``: the same result as its
    ``plan.table``, and that is DDIM (Song et al. 2021 eq. 12, eta = 0) written out at the plan's step 2."""
    plan = fastguide.samplers.build("ddim", Schedule.ddpm(timestep_spacing="trailing"), steps=10)
    x = _xT(30)
    g = _gen(31)
    eps_u, eps_c = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    w = 3.0
    got = fastguide.guided_step(x, torch.cat([eps_u, eps_c]), plan, 2, scale=w)
    assert torch.equal(got, fastguide.guided_step(x, torch.cat([eps_u, eps_c]), plan.table, 2, scale=w))
    abar = np.cumprod(1 - ref_linear_betas(1000))
    ts = ref_vp_timesteps("trailing", 10).astype(int)
    a, a_prev = abar[ts[2]], abar[ts[3]]
    eps = (eps_u + w * (eps_c - eps_u)).to(F64)
    x0 = (x.to(F64) - math.sqrt(1 - a) * eps) / math.sqrt(a)
    _close(got, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps)
    # out= and the step index are checked against the plan's table as for a tensor
    out = torch.empty_like(x)
    assert fastguide.guided_step(x, eps_c, plan, 0, out=out) is out
    with pytest.raises(ValueError, match="step"):
        fastguide.guided_step(x, eps_c, plan, len(plan.stages))
    with pytest.raises(TypeError, match="table"):
        fastguide.guided_step(x, eps_c, plan.rows, 0)   # the float64 host rows are not a table
