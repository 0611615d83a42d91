"""Native rectified-flow sampling: ``Schedule.flow`` with ``sampler="euler"`` / ``"heun"`` and every guidance
method, against independent references.

* The schedule's sigmas against diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (shift, dynamic
  shifting, shift_terminal) and ``Schedule.from_diffusers``.
* Whole loops against diffusers' own flow loops (``FlowMatchEulerDiscreteScheduler`` /
  ``FlowMatchHeunDiscreteScheduler`` driving the same velocity model, CFG combined as a pipeline does) and
  against float64 Euler / Heun on the velocity ODE written here from the formulas, with CFG (+ rescale),
  ADM classifier guidance on x_t, Ma et al.'s classifier on ``x0^ = x - s v``, discriminator guidance and
  clipping. The references take their sigma grid from diffusers, never from fastguide.
* Exact Gaussian-mixture checks: on ``x_s = (1 - s) x0 + s eps`` a Gaussian component stays Gaussian, so the
  exact velocity, noisy classifier and density ratio are closed forms, and the samplers' output laws are
  linear-Gaussian recursions computed here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler  # noqa: E402

import fastguide  # noqa: E402
from fastguide import Schedule  # noqa: E402
from fastguide.tools.opcount import OpCounter  # noqa: E402

F64 = torch.float64
B, C, H, W = 4, 2, 3, 3
K = 5
T = 1000

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _xT(seed=0, shape=(B, C, H, W)):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float32)


def _close(fast, ref, tol=2e-4):
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast.to(F64), ref.to(F64), rtol=tol, atol=tol)


def _differs(a, b, by=1e-2):
    assert (a.to(F64) - b.to(F64)).abs().max() > by


def diffusers_sigmas(config=None, steps=10, mu=None, cls=FlowMatchEulerDiscreteScheduler) -> np.ndarray:
    """The sigma grid (with its final 0) of a diffusers flow scheduler, float64: the references' schedule."""
    sched = cls(**(config or {}))
    sched.set_timesteps(steps, mu=mu) if mu is not None else sched.set_timesteps(steps)
    sig = sched.sigmas.double().numpy()
    return np.unique(sig)[::-1].copy() if cls is FlowMatchHeunDiscreteScheduler else sig


# ---------------------------------------------------------------------------------------------------
# The schedule

SCHEDULES = [
    # (id, Schedule.flow kwargs, diffusers config, set_timesteps mu)
    ("plain", dict(), dict(), None),
    ("sd3-shift3", dict(shift=3.0), dict(shift=3.0), None),
    ("flux-dynamic", dict(mu=1.15), dict(use_dynamic_shifting=True), 1.15),
    ("dynamic-linear", dict(mu=2.0, time_shift_type="linear"),
     dict(use_dynamic_shifting=True, time_shift_type="linear"), 2.0),
    ("ltx-terminal", dict(shift=2.0, shift_terminal=0.1), dict(shift=2.0, shift_terminal=0.1), None),
    ("qwen-dynamic-terminal", dict(mu=0.7, shift_terminal=0.02),
     dict(use_dynamic_shifting=True, shift_terminal=0.02), 0.7),
    ("t500", dict(shift=3.0, num_train_timesteps=500), dict(shift=3.0, num_train_timesteps=500), None),
]


@pytest.mark.parametrize("name,kwargs,config,mu", SCHEDULES, ids=[s[0] for s in SCHEDULES])
@pytest.mark.parametrize("steps", [2, 7, 28, 50])
def test_flow_sigmas_are_diffusers(name, kwargs, config, mu, steps):
    schedule = Schedule.flow(**kwargs)
    want = diffusers_sigmas(config, steps, mu)
    got = schedule.flow_sigmas(steps)
    np.testing.assert_allclose(got, want[:-1], rtol=0, atol=1e-7)   # diffusers rounds its grid to fp32
    assert want[-1] == 0.0 and got[0] == 1.0
    T_ = schedule.num_train_timesteps
    np.testing.assert_allclose(schedule.timesteps(steps), got * T_)
    plan = fastguide.samplers.build("euler", schedule, steps)
    np.testing.assert_allclose([st.t_model for st in plan.stages], got * T_)
    np.testing.assert_allclose([st.alpha for st in plan.stages], 1.0 - got)


def test_from_diffusers_reads_a_flow_scheduler():
    for cls in (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler):
        s = Schedule.from_diffusers(cls(shift=3.0, num_train_timesteps=1000))
        assert s.kind == "flow" and s.shift == 3.0 and s.prediction_type == "flow_prediction"
        np.testing.assert_allclose(s.flow_sigmas(9), diffusers_sigmas(dict(shift=3.0), 9, cls=cls)[:-1], atol=1e-7)
    s = Schedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=2.0, shift_terminal=0.1))
    assert s.shift_terminal == 0.1
    for option, value, text in [("use_dynamic_shifting", True, "mu"), ("invert_sigmas", True, "invert_sigmas"),
                                ("stochastic_sampling", True, "stochastic_sampling"),
                                ("use_karras_sigmas", True, "use_karras_sigmas")]:
        with pytest.raises(ValueError, match=text):
            Schedule.from_diffusers(FlowMatchEulerDiscreteScheduler(**{option: value}))


BAD_SCHEDULES = [
    (dict(shift=0.0), ValueError, "shift"),
    (dict(shift=-3.0), ValueError, "shift"),
    (dict(shift=float("nan")), ValueError, "shift"),
    (dict(shift="3"), TypeError, "shift"),
    (dict(num_train_timesteps=1), ValueError, "num_train_timesteps"),
    (dict(num_train_timesteps=10.5), TypeError, "num_train_timesteps"),
    (dict(num_train_timesteps=True), TypeError, "num_train_timesteps"),
    (dict(mu=float("inf")), ValueError, "mu"),
    (dict(mu=1.0, shift=3.0), ValueError, "mu"),
    (dict(mu=80.0), ValueError, "mu"),
    (dict(mu=0.0, time_shift_type="linear"), ValueError, "mu"),
    (dict(time_shift_type="cubic"), ValueError, "time_shift_type"),
    (dict(shift_terminal=0.0), ValueError, "shift_terminal"),
    (dict(shift_terminal=1.0), ValueError, "shift_terminal"),
    (dict(shift_terminal=float("nan")), ValueError, "shift_terminal"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_SCHEDULES, ids=[str(b[0]) for b in BAD_SCHEDULES])
def test_bad_flow_schedules_name_the_parameter(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        Schedule.flow(**kwargs)


def test_bad_flow_sampler_use():
    s = Schedule.flow(shift=3.0)
    for sampler in ("ddim", "ddpm", "dpmpp_2m", "euler_ancestral"):
        with pytest.raises(ValueError, match="flow schedule"):
            fastguide.samplers.build(sampler, s, 10)
    with pytest.raises(TypeError, match="s_churn"):
        fastguide.samplers.build("euler", s, 10, s_churn=1.0)
    with pytest.raises(ValueError, match="steps"):
        s.flow_sigmas(0)
    with pytest.raises(ValueError, match="shift_terminal"):   # one step has no stretch: 1 - 0/0
        Schedule.flow(shift_terminal=0.1).flow_sigmas(1)
    with pytest.raises(ValueError, match="flow"):
        Schedule.edm().flow_sigmas(4)
    model = velocity_model
    with pytest.raises(ValueError, match="gamma"):
        fastguide.sample(model, _xT(), schedule=s, sampler="heun", steps=4, y=_labels(),
                         guidance=[fastguide.ClassifierGuidance(X0Classifier(), input="x0", gamma=0.3)])
    with pytest.raises(ValueError, match="eta"):
        fastguide.sample(model, _xT(), schedule=s, sampler="euler", steps=4, eta=0.5)


# ---------------------------------------------------------------------------------------------------
# Networks (dtype-generic: the float64 references and the float32 loops call the same functions)

def velocity_model(x, t, y=None):
    """A smooth nonlinear velocity v(x, t, y); ``t`` is the diffusers-style timestep s * 1000."""
    tt = (t.to(x.dtype) / T).reshape((-1,) + (1,) * (x.dim() - 1))
    out = 0.6 * torch.tanh(0.8 * x + 0.3 * tt) - 0.5 * x.roll(1, dims=1) * (1.0 - tt) + 0.25 * tt
    if y is not None:
        out = out + 0.05 * y.to(x.dtype).reshape(tt.shape) - 0.02 * (y.to(x.dtype).reshape(tt.shape) == K)
    return out


class LinearClassifier:
    """A noisy classifier of the flow state: logits linear in x, modulated by its timestep."""

    def __init__(self, seed=3, dim=C * H * W):
        g = _gen(seed)
        self.w = torch.randn(dim, K, generator=g, dtype=F64) * 0.7
        self.b = torch.randn(K, generator=g, dtype=F64)

    def __call__(self, x, t):
        return (x.flatten(1) @ self.w.to(x.dtype)) * (1.0 + 0.5 * t.to(x.dtype).reshape(-1, 1) / T) + \
            self.b.to(x.dtype)


class X0Classifier:
    """An off-the-shelf-style classifier of a clean sample: ignores t, softplus hidden layer."""

    def __init__(self, seed=5, dim=C * H * W, hidden=7):
        g = _gen(seed)
        self.w1 = torch.randn(dim, hidden, generator=g, dtype=F64)
        self.w2 = torch.randn(hidden, K, generator=g, dtype=F64)

    def __call__(self, x, t=None):
        return torch.nn.functional.softplus(x.flatten(1) @ self.w1.to(x.dtype), beta=3.0) @ self.w2.to(x.dtype)


def logit_discriminator(x, t, y=None):
    return torch.tanh(x.flatten(1)).mean(1) * 2.0 - 0.3 * (t.to(x.dtype) / T)


def _labels():
    return torch.tensor([1, 3, 0, 4])[:B]


def _grad(fn, x):
    with torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    return g


def _log_softmax_grad(clf, x, t, y, scale):
    return scale * _grad(lambda z: torch.log_softmax(clf(z, t), 1).gather(1, y.view(-1, 1)).squeeze(1), x)


# ---------------------------------------------------------------------------------------------------
# float64 references: Euler and Heun on dx/ds = v, with the guided velocity v - s/(1-s) g

def ref_flow_loop(velocity, x_T, sigmas, *, heun=False, score=None, score2=None, x0_grad=None, clip=None):
    """``velocity(x, s) -> v`` (CFG combined); ``score(x, s)``: the state gradient of stage 1 (x_t
    classifiers + discriminators), ``score2``: Heun's second stage (discriminator weight2); ``x0_grad(x0, s)``:
    an x0^ classifier's gradient, in both Heun stages (Heun on the guided ODE). Gradients are 0 at s = 1, where
    s/(1-s) is infinite (unguided)."""
    x = x_T.to(F64)
    k = lambda s: 0.0 if s == 1.0 else s / (1.0 - s)  # noqa: E731
    for i in range(len(sigmas) - 1):
        s, nxt = float(sigmas[i]), float(sigmas[i + 1])
        h = nxt - s
        v = velocity(x, s)
        if clip is not None:               # x0^ clipped, the velocity re-derived from it: (x - x0^) / s
            v = (x - (x - s * v).clamp(*clip)) / s
        if x0_grad is not None and s < 1.0:
            v = v - k(s) * x0_grad(x - s * v, s)
        if score is not None and s < 1.0:
            v = v - k(s) * score(x, s)
        x_e = x + h * v
        if not heun or nxt == 0.0:
            x = x_e
            continue
        v2 = velocity(x_e, nxt)
        if clip is not None:
            v2 = (x_e - (x_e - nxt * v2).clamp(*clip)) / nxt
        if x0_grad is not None:
            v2 = v2 - k(nxt) * x0_grad(x_e - nxt * v2, nxt)
        if score2 is not None:
            v2 = v2 - k(nxt) * score2(x_e, nxt)
        x = x + 0.5 * h * (v + v2)
    return x


def _cfg_velocity(w, y, null=K, rescale=0.0):
    """The CFG-combined velocity at noise level s (rescale: diffusers' rescale_noise_cfg, written out)."""
    def velocity(x, s):
        t = torch.full((x.shape[0],), s * T, dtype=x.dtype)
        u, c = velocity_model(x, t, torch.full_like(y, null)), velocity_model(x, t, y)
        g = u + w * (c - u)
        if rescale:
            dims = list(range(1, g.dim()))
            g = rescale * g * (c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True)) + (1 - rescale) * g
        return g
    return velocity


def _t(x, s):
    return torch.full((x.shape[0],), s * T, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------------
# Whole loops against diffusers' flow loops and the float64 references

def diffusers_flow_loop(cls, config, steps, x_T, w, y, mu=None):
    """A pipeline's loop: one 2B call on [x; x] with labels [null; y], CFG, ``scheduler.step``."""
    sched = cls(**config)
    sched.set_timesteps(steps, mu=mu) if mu is not None else sched.set_timesteps(steps)
    x = x_T.clone()
    for t in sched.timesteps:
        out = velocity_model(torch.cat([x, x]), t.repeat(2 * x.shape[0]), torch.cat([torch.full_like(y, K), y]))
        u, c = out.chunk(2)
        x = sched.step(u + w * (c - u), t, x).prev_sample
    return x


@pytest.mark.parametrize("sampler,cls", [("euler", FlowMatchEulerDiscreteScheduler),
                                         ("heun", FlowMatchHeunDiscreteScheduler)])
@pytest.mark.parametrize("kwargs,config,mu", [(dict(shift=3.0), dict(shift=3.0), None),
                                              (dict(), dict(), None),
                                              (dict(mu=1.15), dict(use_dynamic_shifting=True), 1.15)],
                         ids=["sd3", "plain", "flux-dynamic"])
def test_cfg_loop_matches_diffusers_flow_loop(sampler, cls, kwargs, config, mu):
    if cls is FlowMatchHeunDiscreteScheduler and mu is not None:
        pytest.skip("FlowMatchHeunDiscreteScheduler has no dynamic shifting")
    steps, y, x_T = 12, _labels(), _xT(1)
    got = fastguide.sample(velocity_model, x_T, schedule=Schedule.flow(**kwargs), sampler=sampler, steps=steps,
                           y=y, guidance=[fastguide.CFG(4.0, null_label=K)])
    want = diffusers_flow_loop(cls, config, steps, x_T, 4.0, y, mu)
    _close(got, want, 1e-4)
    # and the float64 reference of the same ODE on diffusers' grid
    ref = ref_flow_loop(_cfg_velocity(4.0, y), x_T, diffusers_sigmas(config, steps, mu, cls), heun=sampler == "heun")
    _close(got, ref)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_per_sample_cfg_rescale_and_token_latents(sampler):
    # [B, L, D] token-shaped states, per-sample CFG scales, diffusers' rescale on the velocity
    shape = (B, 6, 4)
    x_T = torch.randn(shape, generator=_gen(4))
    w = torch.tensor([1.0, 2.5, 4.0, 7.0])
    y = _labels()
    got = fastguide.sample(velocity_model, x_T, schedule=Schedule.flow(shift=3.0), sampler=sampler, steps=10, y=y,
                           guidance=[fastguide.CFG(w, rescale=0.6, null_label=K)])
    velocity = _cfg_velocity(w.to(F64).view(-1, 1, 1), y, rescale=0.6)
    ref = ref_flow_loop(velocity, x_T, diffusers_sigmas(dict(shift=3.0), 10), heun=sampler == "heun")
    _close(got, ref)


def test_model_sees_the_state_and_diffusers_timesteps():
    calls = []

    def model(x, t, y):
        calls.append((x.clone(), t.clone()))
        return velocity_model(x, t, y)
    x_T = _xT(2)
    fastguide.sample(model, x_T, schedule=Schedule.flow(shift=3.0), sampler="heun", steps=5)
    sched = FlowMatchHeunDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    assert len(calls) == len(sched.timesteps) == 9
    for (x, t), want in zip(calls, sched.timesteps):
        assert t.dtype == torch.float32 and t.shape == (B,)
        torch.testing.assert_close(t, want.repeat(B), rtol=1e-6, atol=1e-4)
    assert torch.equal(calls[0][0], x_T)          # s = 1: x_T is the starting state itself


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_classifier_guidance_on_xt_matches_reference(sampler):
    clf, y, x_T = LinearClassifier(), _labels(), _xT(5)
    spec = fastguide.ClassifierGuidance(clf, scale=2.0)
    run = lambda g: fastguide.sample(velocity_model, x_T, schedule=Schedule.flow(shift=3.0),  # noqa: E731
                                     sampler=sampler, steps=10, y=y, guidance=g)
    got = run([fastguide.CFG(3.0, null_label=K), spec])
    ref = ref_flow_loop(_cfg_velocity(3.0, y), x_T, diffusers_sigmas(dict(shift=3.0), 10), heun=sampler == "heun",
                        score=lambda x, s: _log_softmax_grad(clf, x, _t(x, s), y, 2.0))
    _close(got, ref)
    _differs(got, run([fastguide.CFG(3.0, null_label=K)]))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_x0_classifier_matches_reference(sampler):
    # Ma et al.: the classifier sees x0^ = x - s v (clipped as the loop clips); its gradient enters as a score
    # correction of the velocity, v -= s/(1-s) g (on Heun in both stages: Heun on the guided ODE).
    clf, y, x_T = X0Classifier(), _labels(), _xT(6)
    for clip in (None, (-1.0, 1.0)):
        got = fastguide.sample(velocity_model, x_T, schedule=Schedule.flow(shift=2.0), sampler=sampler, steps=12,
                               y=y, guidance=[fastguide.ClassifierGuidance(clf, input="x0", scale=0.7, tau2=0.5)],
                               clip_denoised=clip)

        def x0_grad(x0, s):
            x0c = x0.clamp(*clip) if clip is not None else x0
            return 0.7 * _grad(lambda z: (clf(z).gather(1, y.view(-1, 1)).squeeze(1) -
                                          torch.logsumexp(0.5 * clf(z), 1)), x0c)
        velocity = lambda x, s: velocity_model(x, _t(x, s), y)  # noqa: E731
        ref = ref_flow_loop(velocity, x_T, diffusers_sigmas(dict(shift=2.0), 12), heun=sampler == "heun",
                            x0_grad=x0_grad, clip=clip)
        _close(got, ref)
        plain = fastguide.sample(velocity_model, x_T, schedule=Schedule.flow(shift=2.0), sampler=sampler, steps=12,
                                 y=y, clip_denoised=clip)
        _differs(got, plain)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_discriminator_guidance_matches_reference(sampler):
    x_T, steps = _xT(7), 10
    spec = fastguide.DiscriminatorGuidance(logit_discriminator, weight=1.5, weight2=0.7, t_min=0.1, t_max=0.95)
    got = fastguide.sample(velocity_model, x_T, schedule=Schedule.flow(), sampler=sampler, steps=steps,
                           guidance=[spec])

    def dg(weight):
        def score(x, s):
            if not 0.1 <= s <= 0.95:
                return torch.zeros_like(x)
            return _grad(lambda z: weight * logit_discriminator(z, _t(z, s)).clamp(-11.5, 11.5), x)
        return score
    velocity = lambda x, s: velocity_model(x, _t(x, s))  # noqa: E731
    ref = ref_flow_loop(velocity, x_T, diffusers_sigmas({}, steps), heun=sampler == "heun", score=dg(1.5),
                        score2=dg(0.7))
    _close(got, ref)
    _differs(got, fastguide.sample(velocity_model, x_T, schedule=Schedule.flow(), sampler=sampler, steps=steps))


def test_guided_flow_loop_never_syncs():
    y, x_T = _labels(), _xT(8)
    guidance = [fastguide.CFG(3.0, null_label=K),
                fastguide.ClassifierGuidance(LinearClassifier()),
                fastguide.DiscriminatorGuidance(logit_discriminator, weight2=1.0)]
    fastguide.sample(velocity_model, x_T, schedule=Schedule.flow(shift=3.0), sampler="heun", steps=6, y=y,
                     guidance=guidance)   # built and cached: the counted call below is the loop itself
    with OpCounter() as counter:
        out = fastguide.sample(velocity_model, x_T, schedule=Schedule.flow(shift=3.0), sampler="heun", steps=6,
                               y=y, guidance=guidance)
    assert torch.isfinite(out).all()
    assert counter.syncs() == [] and counter.host_values() == [], counter.histogram()
    assert counter.names.count("fastguide.guided_step") == 11     # 2 * 6 - 1 stages, one fused step each


# ---------------------------------------------------------------------------------------------------
# Exact Gaussian-mixture checks

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=F64)
S0 = 0.4
PI = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
PI_MODEL = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
NCLS = 3
Z = 4.5   # tolerance in standard errors


def _s_of(t):
    return t.to(F64) / T


def _log_joint(x, s, pi):
    """[B, K]: log pi_k + log N(x; (1 - s) mu_k, ((1 - s)^2 S0^2 + s^2) I) in 2-D."""
    var = (1 - s) ** 2 * S0 ** 2 + s ** 2
    d2 = ((x[:, None, :] - (1 - s)[:, None, None] * MEANS[None]) ** 2).sum(-1)
    return torch.log(pi)[None] - d2 / (2 * var[:, None]) - torch.log(2 * math.pi * var)[:, None]


def exact_velocity(x, t, pi=PI, y=None):
    """E[eps - x0 | x_s] of the mixture (of component y alone when given), in closed form."""
    xd, s = x.to(F64), _s_of(t)
    var = ((1 - s) ** 2 * S0 ** 2 + s ** 2)[:, None]
    r = torch.nn.functional.one_hot(y, NCLS).to(F64) if y is not None else torch.softmax(_log_joint(xd, s, pi), 1)
    centred = xd[:, None, :] - (1 - s)[:, None, None] * MEANS[None]            # [B, K, 2]
    e_eps = s[:, None, None] * centred / var[:, :, None]
    e_x0 = MEANS[None] + ((1 - s) * S0 ** 2)[:, None, None] * centred / var[:, :, None]
    return ((r[:, :, None] * (e_eps - e_x0)).sum(1)).to(x.dtype)


def exact_classifier(x, t):
    return _log_joint(x.to(F64), _s_of(t), PI).to(x.dtype)


def log_ratio(x, t, y=None):
    xd, s = x.to(F64), _s_of(t)
    return (torch.logsumexp(_log_joint(xd, s, PI), 1) - torch.logsumexp(_log_joint(xd, s, PI_MODEL), 1)).to(x.dtype)


def nearest_component(x):
    return ((x.to(F64)[:, None, :] - MEANS[None]) ** 2).sum(-1).argmin(1)


def gaussian_flow_prediction(sigmas, mu, heun=False, first_mean=None):
    """Mean and per-dimension variance of Euler / Heun with the exact velocity of N(mu, S0^2 I) from
    x_T ~ N(0, I): v = c(s) (x - (1 - s) mu) - mu, c = (s - (1 - s) S0^2) / var_s, so every step is affine in
    x. ``first_mean``: the first step (at s = 1) uses the velocity of a distribution with that mean instead
    (at s = 1 every component's velocity is x - mean: the unguided first step of a guided run)."""
    def c(s):
        return (s - (1 - s) * S0 ** 2) / ((1 - s) ** 2 * S0 ** 2 + s ** 2)

    def vel(x, s, i):     # applied to the mean (the map is affine) and its slope for the variance
        if i == 0 and first_mean is not None:
            return x - first_mean, 1.0
        return c(s) * (x - (1 - s) * mu) - mu, c(s)
    m, gain2 = np.zeros(2), 1.0
    for i in range(len(sigmas) - 1):
        s, nxt = sigmas[i], sigmas[i + 1]
        h = nxt - s
        v1, d1 = vel(m, s, i)
        if heun and nxt > 0:
            v2, d2 = vel(m + h * v1, nxt, -1)
            m, gain = m + 0.5 * h * (v1 + v2), 1 + 0.5 * h * (d1 + d2 * (1 + h * d1))
        else:
            m, gain = m + h * v1, 1 + h * d1
        gain2 *= gain * gain
    return m, gain2


def _check_gaussian(xs, pm, pv):
    n = xs.shape[0]
    assert (xs.mean(0) - torch.tensor(pm)).abs().max() < Z * math.sqrt(pv / n), (xs.mean(0), pm)
    assert abs(xs.var(0).mean().item() / pv - 1) < Z * math.sqrt(1 / (n - 1)), (xs.var(0).mean(), pv)


@pytest.mark.parametrize("sampler,steps", [("euler", 400), ("heun", 40)])
def test_exact_velocity_reproduces_the_data_gaussian(sampler, steps):
    n, mu = 6000, np.array([0.7, -1.2])
    x_T = torch.randn(n, 2, generator=_gen(0))
    model = lambda x, t, y: _single(x, t, mu)  # noqa: E731
    out = fastguide.sample(model, x_T, schedule=Schedule.flow(shift=3.0), sampler=sampler, steps=steps)
    sig = diffusers_sigmas(dict(shift=3.0), steps, cls=FlowMatchEulerDiscreteScheduler)
    pm, pv = gaussian_flow_prediction(sig, mu, heun=sampler == "heun")
    # the discrete sampler's target is close to the data's N(mu, S0^2) ... and the samples match it
    assert np.abs(pm - mu).max() < 0.01 and abs(pv / S0 ** 2 - 1) < 0.03, (pm, pv)
    _check_gaussian(out.to(F64), pm, pv)


def _single(x, t, mu):
    """The exact velocity of N(mu, S0^2 I) data."""
    s = _s_of(t)[:, None]
    var = (1 - s) ** 2 * S0 ** 2 + s ** 2
    m = torch.tensor(mu, dtype=F64)[None]
    centred = x.to(F64) - (1 - s) * m
    return ((s - (1 - s) * S0 ** 2) / var * centred - m).to(x.dtype)


def test_classifier_guidance_at_scale_one_samples_the_class_conditional():
    # v - s/(1-s) grad log p(y | x_s) is exactly the conditional velocity for s < 1; the step at s = 1 is
    # unguided (the marginal's velocity x - E[x0]), which the prediction models exactly. (Euler: on Heun an
    # x_t classifier guides the first stage only, as ADM's recipe does, so its correction stage is unguided.)
    n, sampler, steps = 6000, "euler", 150
    y = torch.arange(n) % NCLS
    x_T = torch.randn(n, 2, generator=_gen(1))
    run = lambda g: fastguide.sample(lambda x, t, yy: exact_velocity(x, t), x_T,  # noqa: E731
                                     schedule=Schedule.flow(), sampler=sampler, steps=steps, y=y, guidance=g)
    out = run([fastguide.ClassifierGuidance(exact_classifier, scale=1.0)])
    sig = diffusers_sigmas({}, steps)
    comp = nearest_component(out)
    for k in range(NCLS):
        assert (comp[y == k] == k).double().mean() >= 0.995
        pm, pv = gaussian_flow_prediction(sig, MEANS[k].numpy(), heun=sampler == "heun",
                                          first_mean=(PI @ MEANS).numpy())
        assert np.abs(pm - MEANS[k].numpy()).max() < 0.05 and abs(pv / S0 ** 2 - 1) < 0.05, (k, pm, pv)
        _check_gaussian(out[y == k].to(F64), pm, pv)
    # the test can fail: unguided, the samples follow the mixture weights, not the labels
    frac = torch.bincount(nearest_component(run([])), minlength=NCLS).double() / n
    assert (frac - PI).abs().max() < Z * math.sqrt(0.25 / n)


def test_cfg_scale_one_is_the_conditional_model():
    n, steps = 3000, 100
    y = torch.arange(n) % NCLS
    x_T = torch.randn(n, 2, generator=_gen(2))

    def cfg_model(x, t, yy):       # label NCLS is the null label: the mixture's velocity
        cond = exact_velocity(x, t, y=yy.clamp(max=NCLS - 1))
        return torch.where((yy == NCLS)[:, None], exact_velocity(x, t), cond)
    out = fastguide.sample(cfg_model, x_T, schedule=Schedule.flow(shift=3.0), sampler="euler", steps=steps, y=y,
                           guidance=[fastguide.CFG(1.0, null_label=NCLS)])
    pm, pv = gaussian_flow_prediction(diffusers_sigmas(dict(shift=3.0), steps), MEANS[0].numpy())
    _check_gaussian(out[y == 0].to(F64), pm, pv)


@pytest.mark.parametrize("sampler,steps", [("euler", 150), ("heun", 40)])
def test_discriminator_guidance_recovers_the_true_weights(sampler, steps):
    # With the exact log density ratio (weight 1 in both Heun stages) the guided velocity is the true
    # mixture's, v_model - s/(1-s) grad log(p / p_model) = v_true, for s < 1.
    n = 4000
    x_T = torch.randn(n, 2, generator=_gen(3))
    model = lambda x, t, y: exact_velocity(x, t, pi=PI_MODEL)  # noqa: E731
    run = lambda g: fastguide.sample(model, x_T, schedule=Schedule.flow(), sampler=sampler,  # noqa: E731
                                     steps=steps, guidance=g)
    se = Z * math.sqrt(0.25 / n)
    plain = torch.bincount(nearest_component(run([])), minlength=NCLS).double() / n
    assert (plain - PI_MODEL).abs().max() < se, plain
    out = run([fastguide.DiscriminatorGuidance(log_ratio, weight=1.0, weight2=1.0)])
    frac = torch.bincount(nearest_component(out), minlength=NCLS).double() / n
    assert (frac - PI).abs().max() < se, frac
    comp = nearest_component(out)
    for k in range(NCLS):
        xs = out[comp == k].to(F64)
        assert (xs.mean(0) - MEANS[k]).abs().max() < Z * S0 / math.sqrt(xs.shape[0]) + 0.03


def test_inductor_flow_loop_equals_eager():
    # compile="inductor" compiles one body per stage kind; a flow loop has no kind of its own to special-case
    y, x_T = _labels(), _xT(9)
    kw = dict(schedule=Schedule.flow(shift=3.0), sampler="heun", steps=4, y=y,
              guidance=[fastguide.CFG(3.0, null_label=K), fastguide.ClassifierGuidance(LinearClassifier())])
    eager = fastguide.sample(velocity_model, x_T, **kw)
    compiled = fastguide.sample(velocity_model, x_T, compile="inductor", **kw)
    _close(compiled, eager, 1e-5)
