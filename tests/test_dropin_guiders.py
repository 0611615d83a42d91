"""fastguide.step(..., guider=g) against diffusers' own guiders: ``scheduler.step(g.forward(c, u).pred, ...)``.

Each loop runs two guider/scheduler pairs side by side: the reference (diffusers only) and the fused one
(fastguide.step, except every third step, where it goes through g.forward + scheduler.step itself, so the
two paths alternate on one guider and scheduler state, APG's running average included). Per step both start
from the same latents (teacher forcing, tight tolerance); the guider and scheduler states stay each pair's
own. A free-running loop per guider, the rows outside the window and bad options are tested separately.
"""

from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler, LCMScheduler, UniPCMultistepScheduler)
from diffusers import guiders as dg  # noqa: E402

import fastguide  # noqa: E402



@pytest.fixture(autouse=True)
def quiet_guiders():
    """diffusers warns "Guiders are currently an experimental feature" per guider; silenced here only (other
    test files assert on diffusers' own warnings)."""
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


B, SHAPE = 2, (2, 6, 16)       # token-shaped latents [B, L, D] (diffusers' MAMBO-G needs them)
STEPS = 8
STEP_TOL = 1e-5
LOOP_TOL = 2e-5


def _backend() -> str:
    """auto, unless the compiled CPU backend lacks the gram (compiled backends are being extended)."""
    try:
        fastguide.guidance_gram(torch.randn(2, 3), backend="auto")
        return "auto"
    except AttributeError:
        return "torch"


BACKEND = _backend()

SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(),
    "euler": lambda: EulerDiscreteScheduler(),
    "dpmpp2m": lambda: DPMSolverMultistepScheduler(solver_order=2),
    "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
}

GUIDERS = {
    "cfg": lambda: dg.ClassifierFreeGuidance(5.0),
    "cfg-rescale-orig": lambda: dg.ClassifierFreeGuidance(4.0, guidance_rescale=0.7, use_original_formulation=True),
    "cfg-window": lambda: dg.ClassifierFreeGuidance(3.0, start=0.2, stop=0.7),
    "zero*": lambda: dg.ClassifierFreeZeroStarGuidance(4.0, zero_init_steps=2),
    "zero*-orig-rescale-window": lambda: dg.ClassifierFreeZeroStarGuidance(
        3.0, zero_init_steps=0, use_original_formulation=True, guidance_rescale=0.5, start=0.1, stop=0.8),
    "zero*-init-outside-window": lambda: dg.ClassifierFreeZeroStarGuidance(4.0, zero_init_steps=2, start=0.25),
    "apg": lambda: dg.AdaptiveProjectedGuidance(6.0),
    "apg-momentum-thr-eta": lambda: dg.AdaptiveProjectedGuidance(
        7.5, adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_rescale=3.0, eta=0.3),
    "apg-momentum-orig-rescale-window": lambda: dg.AdaptiveProjectedGuidance(
        5.0, adaptive_projected_guidance_momentum=0.6, adaptive_projected_guidance_rescale=0.0, eta=0.0,
        use_original_formulation=True, guidance_rescale=0.3, start=0.25, stop=0.75),
    "apg-mix": lambda: dg.AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=2,
                                                       adaptive_projected_guidance_rescale=3.0),
    "apg-mix-no-momentum-rescale": lambda: dg.AdaptiveProjectedMixGuidance(
        guidance_scale=4.0, adaptive_projected_guidance_scale=6.0, adaptive_projected_guidance_momentum=None,
        eta=0.5, guidance_rescale=0.5, stop=0.8, adaptive_projected_guidance_start_step=3),
    "mambo": lambda: dg.MagnitudeAwareGuidance(alpha=2.0),
    "mambo-orig-rescale-window": lambda: dg.MagnitudeAwareGuidance(
        6.0, alpha=8.0, use_original_formulation=True, guidance_rescale=0.4, start=0.2),
    "tcfg": lambda: dg.TangentialClassifierFreeGuidance(5.0),
    "tcfg-rescale-window": lambda: dg.TangentialClassifierFreeGuidance(3.0, guidance_rescale=0.5, stop=0.6),
}


_PATTERN = torch.randn(1024, generator=torch.Generator().manual_seed(123))


def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """[uncond; cond] for x at t; the halves differ so guidance matters. Like an eps or velocity network's,
    the outputs have a mean small against their spread whatever x is (a fixed pattern): guidance_rescale's
    standard deviations come from sums of squares, whose fp32 rounding grows with (mean / std)^2."""
    t = float(t)
    pattern = _PATTERN[: x[0].numel()].reshape(x.shape[1:])
    u = 0.6 * torch.tanh(0.7 * x) + 0.4 * torch.sin(0.013 * t + 2.0 * pattern)
    c = u + 0.3 * torch.cos(1.3 * x + 0.002 * t + pattern) - 0.05
    return torch.cat([u, c])


def rel(got, ref) -> float:
    assert got.shape == ref.shape and torch.isfinite(got).all() and torch.isfinite(ref).all()
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def begin(guider, scheduler, i, t):
    """What a modular pipeline does before the denoiser: the guider's state (prepare_inputs makes APG's
    momentum buffer at step 0), the scheduler's input scaling."""
    guider.set_state(step=i, num_inference_steps=STEPS, timestep=t)
    guider.prepare_inputs({})


def diffusers_step(guider, scheduler, mo, t, x):
    u, c = mo.chunk(2)
    pred = guider.forward(pred_cond=c, pred_uncond=u).pred
    return scheduler.step(pred, t, x).prev_sample


def fused_step(guider, scheduler, mo, t, x, always_2b=False):
    rows = mo if always_2b or guider.num_conditions == 2 else mo[B:]
    return fastguide.step(rows, t, x, scheduler=scheduler, guider=guider, backend=BACKEND)


def buffer_of(guider):
    buf = getattr(guider, "momentum_buffer", None)
    return None if buf is None else buf.running_average


def check_buffers(ref, got):
    a, b = buffer_of(ref), buffer_of(got)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
        assert rel(b, a) < 1e-5
    else:
        assert a == b


def make_pair(guider_id, scheduler_id):
    sched = SCHEDULERS[scheduler_id]()
    sched.set_timesteps(STEPS)
    guider = GUIDERS[guider_id]()
    return (guider, sched), (copy.deepcopy(guider), copy.deepcopy(sched))


@pytest.mark.parametrize("scheduler_id", list(SCHEDULERS))
@pytest.mark.parametrize("guider_id", list(GUIDERS))
def test_guider_loop_matches_diffusers(guider_id, scheduler_id):
    (g_ref, s_ref), (g_fg, s_fg) = make_pair(guider_id, scheduler_id)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    fused_steps = 0
    for i, t in enumerate(s_ref.timesteps):
        begin(g_ref, s_ref, i, t)
        begin(g_fg, s_fg, i, t)
        assert g_ref.num_conditions == g_fg.num_conditions
        x_in = s_ref.scale_model_input(x, t) if hasattr(s_ref, "scale_model_input") else x
        s_fg.scale_model_input(x, t) if hasattr(s_fg, "scale_model_input") else None
        mo = fake_model(x_in, t)
        want = diffusers_step(g_ref, s_ref, mo, t, x)
        if i % 3 == 1:        # the fused pair goes through diffusers on this step: the paths alternate
            got = diffusers_step(g_fg, s_fg, mo, t, x)
        else:
            got = fused_step(g_fg, s_fg, mo, t, x)
            fused_steps += 1
        assert rel(got, want) < STEP_TOL, (i, rel(got, want))
        check_buffers(g_ref, g_fg)
        assert getattr(s_fg, "step_index", None) == getattr(s_ref, "step_index", None)
        x = want
    assert fused_steps > 0


@pytest.mark.parametrize("guider_id", ["cfg-rescale-orig", "zero*", "apg-momentum-thr-eta", "apg-mix", "mambo",
                                       "tcfg-rescale-window"])
def test_free_running_loop(guider_id):
    (g_ref, s_ref), (g_fg, s_fg) = make_pair(guider_id, "flow")
    x_ref = x_fg = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(s_ref.timesteps):
        begin(g_ref, s_ref, i, t)
        begin(g_fg, s_fg, i, t)
        x_ref = diffusers_step(g_ref, s_ref, fake_model(x_ref, t), t, x_ref)
        x_fg = fused_step(g_fg, s_fg, fake_model(x_fg, t), t, x_fg)
    assert rel(x_fg, x_ref) < LOOP_TOL
    check_buffers(g_ref, g_fg) if buffer_of(g_ref) is None else \
        (rel(buffer_of(g_fg), buffer_of(g_ref)) < LOOP_TOL or pytest.fail("running average"))


@pytest.mark.parametrize("guider_id", ["cfg-window", "zero*-init-outside-window", "apg-momentum-orig-rescale-window",
                                       "tcfg-rescale-window"])
def test_2b_rows_outside_the_window(guider_id):
    """Outside its window a guider takes B cond rows (num_conditions 1), or 2B whose cond half is used."""
    (g_ref, s_ref), (g_fg, s_fg) = make_pair(guider_id, "ddim")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    outside = 0
    for i, t in enumerate(s_ref.timesteps):
        begin(g_ref, s_ref, i, t)
        begin(g_fg, s_fg, i, t)
        outside += g_fg.num_conditions == 1
        mo = fake_model(x, t)
        want = diffusers_step(g_ref, s_ref, mo, t, x)
        assert rel(fused_step(g_fg, s_fg, mo, t, x, always_2b=True), want) < STEP_TOL
        check_buffers(g_ref, g_fg)
        x = want
    assert outside > 0


@pytest.mark.parametrize("make", [
    lambda: dg.ClassifierFreeGuidance(4.0, guidance_rescale=0.5),
    lambda: dg.ClassifierFreeZeroStarGuidance(4.0, zero_init_steps=0),
    lambda: dg.AdaptiveProjectedGuidance(6.0, adaptive_projected_guidance_momentum=-0.5, eta=0.2,
                                         adaptive_projected_guidance_rescale=2.0),
    lambda: dg.TangentialClassifierFreeGuidance(4.0),
])
def test_image_latents(make):
    """4-D [B, C, H, W] latents (fastguide.step takes any shape)."""
    g_ref, sched = make(), DDIMScheduler()
    sched.set_timesteps(STEPS)
    g_fg, s_fg = copy.deepcopy(g_ref), copy.deepcopy(sched)
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    for i, t in enumerate(sched.timesteps[:4]):
        begin(g_ref, sched, i, t)
        begin(g_fg, s_fg, i, t)
        mo = fake_model(x, t)
        want = diffusers_step(g_ref, sched, mo, t, x)
        assert rel(fused_step(g_fg, s_fg, mo, t, x), want) < STEP_TOL
        check_buffers(g_ref, g_fg)
        x = want


def test_mambo_on_image_latents_differs_from_diffusers_which_raises():
    """diffusers 0.42's mambo_guidance cannot take 4-D latents (torch.norm over three dims); fastguide's
    norms are over all non-batch elements, and the step is the formula's."""
    g = dg.MagnitudeAwareGuidance(6.0, alpha=3.0)
    sched = DDIMScheduler()
    sched.set_timesteps(STEPS)
    t = sched.timesteps[2]
    g.set_state(step=2, num_inference_steps=STEPS, timestep=t)
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(4))
    mo = fake_model(x, t)
    u, c = mo.chunk(2)
    with pytest.raises(Exception):
        g.forward(pred_cond=c, pred_uncond=u)
    ratio = ((c - u).flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    pred = u + (1 + 5.0 * torch.exp(-3.0 * ratio)) * (c - u)
    want = copy.deepcopy(sched).step(pred, t, x).prev_sample
    assert rel(fastguide.step(mo, t, x, scheduler=sched, guider=g, backend=BACKEND), want) < STEP_TOL


def test_zero_star_rescale_on_zero_init_step():
    """diffusers rescales the zero-init prediction by std(c)/std(0) (NaN); fastguide takes m = 0."""
    g = dg.ClassifierFreeZeroStarGuidance(4.0, zero_init_steps=1, guidance_rescale=0.5)
    sched = DDIMScheduler()
    sched.set_timesteps(STEPS)
    t = sched.timesteps[0]
    g.set_state(step=0, num_inference_steps=STEPS, timestep=t)
    x = torch.randn(SHAPE)
    mo = fake_model(x, t)
    u, c = mo.chunk(2)
    assert torch.isnan(g.forward(pred_cond=c, pred_uncond=u).pred).all()
    want = copy.deepcopy(sched).step(torch.zeros_like(c), t, x).prev_sample
    assert rel(fastguide.step(mo, t, x, scheduler=sched, guider=g, backend=BACKEND), want) < STEP_TOL


# ---------------------------------------------------------------------------------------------------
# Every scheduler kind of the drop-in (fastguide.dropin.schedulers.KINDS), stochastic ones seeded


KIND_STEPS = 5
# id -> (scheduler factory, step options passed to both paths, learned variance); generators go to both paths
EVERY_KIND = {
    "ddpm": (lambda: DDPMScheduler(), {}, False),
    "ddpm-learned-range": (lambda: DDPMScheduler(variance_type="learned_range"), {}, True),
    "ddim-eta": (lambda: DDIMScheduler(), {"eta": 0.6}, False),
    "euler-churn": (lambda: EulerDiscreteScheduler(), {"s_churn": 2.0, "s_tmax": 50.0}, False),
    "euler-ancestral": (lambda: EulerAncestralDiscreteScheduler(), {}, False),
    "dpmpp2m": (lambda: DPMSolverMultistepScheduler(solver_order=2), {}, False),
    "dpmpp2m-sde": (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), {}, False),
    "dpmpp3m": (lambda: DPMSolverMultistepScheduler(solver_order=3), {}, False),
    "unipc-bh2": (lambda: UniPCMultistepScheduler(), {}, False),
    "unipc-bh1-v": (lambda: UniPCMultistepScheduler(solver_type="bh1", prediction_type="v_prediction",
                                                    final_sigmas_type="sigma_min"), {}, False),
    "lcm": (lambda: LCMScheduler(), {}, False),
    "flow-stochastic": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True), {}, False),
    "flow-heun": (lambda: FlowMatchHeunDiscreteScheduler(shift=3.0), {}, False),
    "flow-heun-churn": (lambda: FlowMatchHeunDiscreteScheduler(shift=3.0), {"s_churn": 4.0, "s_tmax": 0.9}, False),
}
KIND_GUIDERS = ["zero*", "apg-momentum-thr-eta", "zero*-orig-rescale-window"]


def test_every_kind_is_covered():
    from fastguide.dropin.schedulers import KINDS
    covered = {type(make()).__name__ for make, _, _ in EVERY_KIND.values()}
    assert covered == set(KINDS)


def kind_model(x, t, learned):
    """fake_model's [uncond; cond], with a variance block in [-1, 1] after each half's C channels (learned)."""
    mo = fake_model(x, t)
    if not learned:
        return mo
    u, c = mo.chunk(2)
    return torch.cat([torch.cat([u, torch.tanh(u)], 1), torch.cat([c, torch.tanh(0.5 * c - 0.2)], 1)])


def kind_reference_pred(guider, mo, channels, learned):
    """What the guider makes of the network output: with a learned variance it guides the prediction
    channels and the cond half's variance is kept (as with guidance_scale)."""
    u, c = mo.chunk(2)
    if not learned:
        return guider.forward(pred_cond=c, pred_uncond=u).pred
    pred = guider.forward(pred_cond=c[:, :channels], pred_uncond=u[:, :channels]).pred
    return torch.cat([pred, c[:, channels:]], 1)


def stage_state(s):
    return (getattr(s, "step_index", None), getattr(s, "state_in_first_order", None),
            getattr(s, "lower_order_nums", None))


@pytest.mark.parametrize("scheduler_id", list(EVERY_KIND))
@pytest.mark.parametrize("guider_id", KIND_GUIDERS)
def test_every_scheduler_kind_with_guider(guider_id, scheduler_id):
    """Teacher-forced, as test_guider_loop_matches_diffusers, on every kind: each call (FlowMatchHeun's two
    stages included) is one pipeline step with the guider's state set for it; the fused pair goes through
    diffusers every third call; both sides draw from equally seeded generators, whose states must agree."""
    make, opts, learned = EVERY_KIND[scheduler_id]
    s_ref = make()
    s_ref.set_timesteps(KIND_STEPS)
    s_fg = copy.deepcopy(s_ref)
    g_ref = GUIDERS[guider_id]()
    g_fg = copy.deepcopy(g_ref)
    gen_ref, gen_fg = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * float(getattr(s_ref, "init_noise_sigma", 1.0))
    n = len(s_ref.timesteps)
    fused_steps = 0
    for i, t in enumerate(s_ref.timesteps):
        for g in (g_ref, g_fg):
            g.set_state(step=i, num_inference_steps=n, timestep=t)
            g.prepare_inputs({})
        x_in = s_ref.scale_model_input(x, t) if hasattr(s_ref, "scale_model_input") else x
        s_fg.scale_model_input(x, t) if hasattr(s_fg, "scale_model_input") else None
        mo = kind_model(x_in, t, learned)
        draws = "generator" in inspect.signature(s_ref.step).parameters  # (UniPC's step takes none)
        want = s_ref.step(kind_reference_pred(g_ref, mo, SHAPE[1], learned), t, x,
                          **({"generator": gen_ref} if draws else {}), **opts).prev_sample
        if i % 3 == 1:
            got = s_fg.step(kind_reference_pred(g_fg, mo, SHAPE[1], learned), t, x,
                            **({"generator": gen_fg} if draws else {}), **opts).prev_sample
        else:
            rows = mo if g_fg.num_conditions == 2 else mo[B:]
            got = fastguide.step(rows, t, x, scheduler=s_fg, guider=g_fg, generator=gen_fg, backend=BACKEND,
                                 **opts)
            fused_steps += 1
        assert rel(got, want) < STEP_TOL, (i, rel(got, want))
        check_buffers(g_ref, g_fg)
        assert stage_state(s_fg) == stage_state(s_ref)
        assert torch.equal(gen_fg.get_state(), gen_ref.get_state()), i
        x = want
    assert fused_steps > 0


# ---------------------------------------------------------------------------------------------------
# Bad input


def _ready(guider, step=1):
    sched = DDIMScheduler()
    sched.set_timesteps(STEPS)
    t = sched.timesteps[step]
    guider.set_state(step=step, num_inference_steps=STEPS, timestep=t)
    x = torch.randn(SHAPE)
    return sched, t, x, fake_model(x, t)


class _OwnForward(dg.ClassifierFreeGuidance):
    def forward(self, pred_cond, pred_uncond=None):
        return super().forward(pred_cond, pred_uncond)


@pytest.mark.parametrize("make,kwargs,match", [
    (lambda: dg.AdaptiveProjectedGuidance(6.0, adaptive_projected_guidance_norm_dim=1), {},
     "adaptive_projected_guidance_norm_dim"),
    (lambda: dg.ClassifierFreeGuidance(5.0), {"guidance_scale": 5.0}, "guider"),
    (lambda: dg.ClassifierFreeGuidance(5.0), {"guidance_rescale": 0.5}, "guider"),
    (lambda: dg.ClassifierFreeGuidance(5.0, guidance_rescale=1.5), {}, "guidance_rescale"),
    (lambda: dg.ClassifierFreeGuidance(float("nan")), {}, "guidance_scale"),
    (lambda: dg.MagnitudeAwareGuidance(5.0, alpha=-1.0), {}, "alpha"),
    (lambda: dg.AdaptiveProjectedGuidance(6.0, eta=float("inf")), {}, "eta"),
    (lambda: dg.ClassifierFreeZeroStarGuidance(4.0, zero_init_steps=1.5), {}, "zero_init_steps"),
    (lambda: dg.AdaptiveProjectedMixGuidance(adaptive_projected_guidance_start_step=None), {},
     "adaptive_projected_guidance_start_step"),
    (lambda: _OwnForward(5.0), {}, "not supported"),
    (lambda: object(), {}, "not supported"),
])
def test_bad_options(make, kwargs, match):
    guider = make()
    sched, t, x, mo = _ready(guider) if hasattr(guider, "set_state") else _ready(dg.ClassifierFreeGuidance())
    with pytest.raises((ValueError, TypeError), match=match):
        fastguide.step(mo, t, x, scheduler=sched, guider=guider, backend=BACKEND, **kwargs)
    assert getattr(sched, "_step_index", None) is None


def test_rows_and_state_errors():
    guider = dg.ClassifierFreeGuidance(5.0)
    sched, t, x, mo = _ready(guider)
    with pytest.raises(ValueError, match="2B|rows"):
        fastguide.step(mo[B:], t, x, scheduler=sched, guider=guider)
    with pytest.raises(ValueError, match="rows"):
        fastguide.step(mo[:3], t, x, scheduler=sched, guider=guider)
    zs = dg.ClassifierFreeZeroStarGuidance(4.0)
    with pytest.raises(ValueError, match="set_state"):
        fastguide.step(mo, t, x, scheduler=sched, guider=zs)


def test_failed_call_leaves_guider_and_scheduler_alone():
    guider = dg.AdaptiveProjectedGuidance(6.0, adaptive_projected_guidance_momentum=0.5)
    sched = EulerDiscreteScheduler()
    sched.set_timesteps(STEPS)
    x = torch.randn(SHAPE)
    for i, t in enumerate(sched.timesteps[:2]):
        begin(guider, sched, i, t)
        sched.scale_model_input(x, t)
        x = fused_step(guider, sched, fake_model(x, t), t, x)
    before, index = buffer_of(guider), sched.step_index
    kept = before.clone()
    t = sched.timesteps[2]
    begin(guider, sched, 2, t)
    with pytest.raises(ValueError, match="out"):
        fastguide.step(fake_model(x, t), t, x, scheduler=sched, guider=guider, out=torch.empty(3, 3))
    assert buffer_of(guider) is before and torch.equal(before, kept) and sched.step_index == index
    guider.momentum_buffer.running_average = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="running_average"):
        fastguide.step(fake_model(x, t), t, x, scheduler=sched, guider=guider)
