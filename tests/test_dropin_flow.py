"""fastguide.step on diffusers' FlowMatchEulerDiscreteScheduler (SD3, Flux, Wan, Qwen-Image), against the real
scheduler.

As in ``test_dropin_diffusers.py``: each config runs a short CFG loop teacher forced (the scheduler steps on
``u + w (c - u)``, a deep copy of it through fastguide.step on the raw [uncond; cond] output) and compares
prev_sample, the output class, the scheduler's step state and the generator's state on every step (so the
stochastic sampler's noise is drawn exactly when and as diffusers draws it). Free-running loops, switching
mid-loop, img2img starts, half precision, classifier / discriminator guidance on the flow state and bad
input follow.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (  # noqa: E402
    FlowMatchEulerDiscreteSchedulerOutput)

import fastguide  # noqa: E402
from fastguide import dropin  # noqa: E402
from fastguide.dropin.scheduler_step import scheduler_step  # noqa: E402
from fastguide.tools.opcount import OpCounter  # noqa: E402

from test_dropin_diffusers import clone_gen, rel_err  # noqa: E402
from test_dropin_diffusers import diffusers_cfg as pipeline_cfg  # noqa: E402  (CFG + rescale_noise_cfg)

IMAGE = (2, 4, 6, 6)      # [B, C, H, W] latents (SD3-like)
TOKENS = (2, 12, 8)       # [B, L, D] packed latents (Flux / Qwen-Image-like)
STEP_TOL = 1e-5           # relative to the reference's largest magnitude, one step from identical inputs
LOOP_TOL = 1e-4           # whole free-running loops
CPU_BACKENDS = [b for b in ("torch", "cpp") if fastguide.backends()[b]]
HAS_SCIPY = importlib.util.find_spec("scipy") is not None

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------
# A deterministic fake transformer (velocity prediction); the pipeline-side CFG is test_dropin_diffusers's

def velocity_model(x: torch.Tensor, t) -> torch.Tensor:
    """[uncond; cond] velocities for latents of any shape at timestep t (= s * 1000); the halves differ."""
    s = float(t) / 1000.0
    base = 0.8 * torch.tanh(0.7 * x) - 0.4 * x.roll(1, dims=-1) * (1.0 - s) + 0.3 * s
    cond = base + 0.3 * torch.cos(1.3 * x + 2.0 * s) - 0.2
    return torch.cat([base, cond])


def state_of(s) -> dict:
    return {"step_index": s._step_index, "begin_index": s._begin_index}


def latents(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# Teacher-forced parity over the configs of today's models

QWEN_IMAGE = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                  max_image_seq_len=8192, shift_terminal=0.02)
CONFIGS = [
    # (id, scheduler config, set_timesteps kwargs, call options, latent shape, steps)
    ("default", dict(), dict(), dict(), IMAGE, 10),
    ("sd3-shift3", dict(shift=3.0), dict(), dict(), IMAGE, 12),
    ("sd3-shift3-per-sample-scale", dict(shift=3.0), dict(), dict(scale="tensor"), IMAGE, 8),
    ("sd3-rescale", dict(shift=3.0), dict(), dict(rescale=0.7), IMAGE, 8),
    ("flux-dynamic-tokens", dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), dict(mu=1.05),
     dict(scale="tensor"), TOKENS, 10),
    ("qwen-image-dynamic-terminal", QWEN_IMAGE, dict(mu=0.7), dict(), TOKENS, 10),
    ("dynamic-linear", dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=1.7), dict(), IMAGE, 8),
    ("wan-shift5-tokens", dict(shift=5.0), dict(), dict(rescale=0.3), TOKENS, 10),
    ("ltx-shift-terminal", dict(shift=2.0, shift_terminal=0.1), dict(), dict(), IMAGE, 8),
    ("invert-sigmas", dict(invert_sigmas=True), dict(), dict(), IMAGE, 8),
    ("invert-sigmas-shift", dict(invert_sigmas=True, shift=3.0), dict(), dict(scale="tensor"), TOKENS, 8),
    ("stochastic", dict(stochastic_sampling=True), dict(), dict(), IMAGE, 10),
    ("stochastic-sd3-tokens", dict(stochastic_sampling=True, shift=3.0), dict(), dict(scale="tensor"), TOKENS, 10),
    ("karras", dict(use_karras_sigmas=True, shift=3.0), dict(), dict(), IMAGE, 10),
    ("exponential", dict(use_exponential_sigmas=True), dict(), dict(), TOKENS, 10),
    ("beta", dict(use_beta_sigmas=True, shift=3.0), dict(), dict(), IMAGE, 10),      # (needs scipy)
    ("custom-sigmas", dict(shift=3.0), dict(sigmas=[1.0, 0.83, 0.61, 0.42, 0.2, 0.07]), dict(), IMAGE, None),
    ("custom-sigmas-and-timesteps", dict(), dict(sigmas=[0.95, 0.7, 0.4, 0.1], timesteps=[950.0, 700.0, 400.0,
                                                                                         100.0]),
     dict(), TOKENS, None),
]


def _split(opts: dict):
    scale = torch.tensor([3.0, 6.5]) if opts.get("scale") == "tensor" else 5.0
    return scale, opts.get("rescale", 0.0)


def make_scheduler(config: dict, set_kwargs: dict, steps) -> FlowMatchEulerDiscreteScheduler:
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(steps, **set_kwargs)
    return sched


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,config,set_kwargs,opts,shape,steps", CONFIGS,
                         ids=[c[0] for c in CONFIGS])
def test_teacher_forced_parity(name, config, set_kwargs, opts, shape, steps, backend):
    if config.get("use_beta_sigmas") and not HAS_SCIPY:
        pytest.skip("beta sigmas need scipy")
    scale, rescale = _split(opts)
    sched = make_scheduler(config, set_kwargs, steps)
    x = latents(shape)
    gen = torch.Generator().manual_seed(1234)
    for t in sched.timesteps:
        mo = velocity_model(x, t)
        twin, twin_gen = copy.deepcopy(sched), clone_gen(gen)
        ref = sched.step(pipeline_cfg(mo, scale, rescale), t, x, generator=gen)
        got = fastguide.step(mo, t, x, scheduler=twin, guidance_scale=scale, guidance_rescale=rescale,
                             generator=twin_gen, return_dict=True, backend=backend)
        assert type(got) is type(ref) is FlowMatchEulerDiscreteSchedulerOutput
        assert rel_err(got.prev_sample, ref.prev_sample) <= STEP_TOL, f"{name} t={t}"
        assert state_of(twin) == state_of(sched)
        assert torch.equal(twin_gen.get_state(), gen.get_state()), "noise drawn differently from diffusers"
        x = ref.prev_sample


def test_plain_velocity_steps_and_return_types():
    # B-row model output without CFG; return_dict=False is diffusers' one-element tuple, unset the tensor
    sched = make_scheduler(dict(shift=3.0), {}, 6)
    ref_sched = copy.deepcopy(sched)
    x = x_ref = latents(TOKENS)
    for i, t in enumerate(sched.timesteps):
        v = velocity_model(x, t)[TOKENS[0]:]
        want = ref_sched.step(v, t, x_ref, return_dict=False)
        if i % 2:
            got = fastguide.step(v, t, x, scheduler=sched, return_dict=False)
            assert isinstance(got, tuple) and len(got) == len(want) == 1
            x = got[0]
        else:
            x = fastguide.step(v, t, x, scheduler=sched)
            assert isinstance(x, torch.Tensor)
        x_ref = want[0]
        assert rel_err(x, x_ref) <= STEP_TOL
    assert sched.step_index == ref_sched.step_index == 6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", [dict(shift=3.0), dict(stochastic_sampling=True)], ids=["ode", "stochastic"])
def test_half_precision_inputs(config, dtype):
    # diffusers upcasts the sample to fp32 (its stochastic noise too) and rounds the result to the model
    # output's dtype; fastguide computes in fp32 and stores in the input dtype: equal to half precision,
    # with the generator advanced alike.
    sched = make_scheduler(config, {}, 6)
    x = latents(IMAGE).to(dtype)
    gen = torch.Generator().manual_seed(3)
    for t in sched.timesteps:
        mo = velocity_model(x.float(), t).to(dtype)
        twin, twin_gen = copy.deepcopy(sched), clone_gen(gen)
        ref = sched.step(pipeline_cfg(mo, 3.0), t, x, generator=gen).prev_sample
        got = fastguide.step(mo, t, x, scheduler=twin, guidance_scale=3.0, generator=twin_gen)
        assert got.dtype == ref.dtype == dtype
        assert rel_err(got, ref) <= 2e-2
        assert torch.equal(twin_gen.get_state(), gen.get_state())
        x = ref


# ---------------------------------------------------------------------------------------------------
# Free-running loops, switching mid-loop, img2img, generators

def run_loop(make, mode, shape=IMAGE, scale=4.0, seed=99, begin=None):
    """A whole loop; ``mode(i)`` says whether step i uses fastguide.step (True) or scheduler.step."""
    sched = make()
    x = latents(shape, seed=3)
    timesteps = sched.timesteps
    if begin is not None:    # img2img: start from a noised image part-way down the schedule
        sched.set_begin_index(begin)
        timesteps = sched.timesteps[begin:]
        x = sched.scale_noise(latents(shape, seed=5), timesteps[:1].repeat(shape[0]), x)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for i, t in enumerate(timesteps):
        mo = velocity_model(x, t)
        if mode(i):
            x = fastguide.step(mo, t, x, scheduler=sched, guidance_scale=scale, generator=gen)
        else:
            x = sched.step(pipeline_cfg(mo, scale), t, x, generator=gen).prev_sample
    return x, sched


LOOPS = [
    ("sd3", lambda: make_scheduler(dict(shift=3.0), {}, 20), dict()),
    ("flux-tokens-per-sample", lambda: make_scheduler(dict(use_dynamic_shifting=True), dict(mu=1.1), 16),
     dict(shape=TOKENS, scale=torch.tensor([2.0, 5.0]))),
    ("stochastic", lambda: make_scheduler(dict(stochastic_sampling=True, shift=3.0), {}, 16), dict()),
    ("img2img", lambda: make_scheduler(dict(shift=3.0), {}, 20), dict(begin=7)),
]


@pytest.mark.parametrize("name,make,kw", LOOPS, ids=[c[0] for c in LOOPS])
def test_whole_loop_and_switching(name, make, kw):
    ref, ref_sched = run_loop(make, lambda i: False, **kw)
    got, got_sched = run_loop(make, lambda i: True, **kw)
    assert rel_err(got, ref) <= LOOP_TOL
    mixed, mixed_sched = run_loop(make, lambda i: i % 3 == 1, **kw)
    assert rel_err(mixed, ref) <= LOOP_TOL
    assert state_of(got_sched) == state_of(mixed_sched) == state_of(ref_sched)


def test_generator_list_and_global_rng_in_stochastic_sampling():
    make = lambda: make_scheduler(dict(stochastic_sampling=True), {}, 6)  # noqa: E731
    sched, ref_sched = make(), make()
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    ref_gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    x = x_ref = latents(IMAGE)
    for t in sched.timesteps:
        x_ref = ref_sched.step(pipeline_cfg(velocity_model(x_ref, t), 2.5), t, x_ref, generator=ref_gens).prev_sample
        x = fastguide.step(velocity_model(x, t), t, x, scheduler=sched, guidance_scale=2.5, generator=gens)
    assert rel_err(x, x_ref) <= LOOP_TOL
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, ref_gens))
    results = []
    for use_fastguide in (False, True):   # generator=None: both draw from torch's global RNG
        torch.manual_seed(123)
        results.append(run_loop(make, lambda i: use_fastguide, seed=None)[0])
    assert rel_err(results[1], results[0]) <= LOOP_TOL


def test_out_aliases_sample_and_one_kernel_per_step():
    sched = make_scheduler(dict(shift=3.0), {}, 5)
    ref_sched = copy.deepcopy(sched)
    x = latents(IMAGE)
    x_ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        mo = velocity_model(x, t)
        x_ref = ref_sched.step(pipeline_cfg(mo, 3.0), t, x_ref).prev_sample
        with OpCounter() as counter:
            res = fastguide.step(mo, t, x, scheduler=sched, guidance_scale=3.0, out=x)
        assert res is x
        if i:   # (the first call finds the step index from the timestep, as scheduler.step does)
            assert counter.names == ["fastguide.guided_step"], counter.names  # no chunk / combine / x0 buffer
        assert rel_err(x, x_ref) <= LOOP_TOL


def test_new_set_timesteps_rebuilds_the_table():
    sched, ref_sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), \
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    for n, mu in ((10, 0.5), (4, 1.2), (10, 0.9)):
        sched.set_timesteps(n, mu=mu)
        ref_sched.set_timesteps(n, mu=mu)
        x = latents(TOKENS)
        for t in sched.timesteps[:3]:
            mo = velocity_model(x, t)
            ref = ref_sched.step(pipeline_cfg(mo, 2.0), t, x).prev_sample
            got = fastguide.step(mo, t, x, scheduler=sched, guidance_scale=2.0)
            assert rel_err(got, ref) <= STEP_TOL
            x = ref
    assert dropin.plan_for(sched).num_steps == 10


def test_prepare_sets_the_counter_from_begin_index():
    sched = make_scheduler(dict(shift=3.0), {}, 8)
    sched.set_begin_index(3)
    plan = dropin.prepare(sched, "cpu")
    assert plan.kind == "flow_match_euler" and plan.num_steps == 8
    assert sched._fastguide_state.next_index == 3


# ---------------------------------------------------------------------------------------------------
# Guidance on the flow state x = (1 - s) x0 + s eps: alpha = 1 - s, sigma = s

GRAD = 0.05 * torch.randn(IMAGE, generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("config", [dict(shift=3.0), dict(stochastic_sampling=True, shift=3.0)],
                         ids=["ode", "stochastic"])
def test_score_correction_is_the_corrected_velocity(config):
    # eps -= s g, x0 += s^2/(1-s) g is v -= s/(1-s) g: the same as stepping the scheduler on that velocity.
    # At s = 1 (the first step) the step is unguided: s/(1-s) is infinite there (rows.score_cols).
    sched = make_scheduler(config, {}, 8)
    x = latents(IMAGE)
    gen = torch.Generator().manual_seed(4)
    for i, t in enumerate(sched.timesteps):
        mo = velocity_model(x, t)
        s = float(sched.sigmas[i])
        k = 0.0 if s == 1.0 else s / (1.0 - s)
        twin, twin_gen = copy.deepcopy(sched), clone_gen(gen)
        ref = sched.step(pipeline_cfg(mo, 2.0) - k * GRAD, t, x, generator=gen).prev_sample
        got, _ = scheduler_step(mo, t, x, scheduler=twin, guidance_scale=2.0, generator=twin_gen, g_score=GRAD)
        assert rel_err(got, ref) <= STEP_TOL, (i, s)
        plan = dropin.plan_for(sched)
        assert plan.alpha[i] == pytest.approx(1.0 - s) and plan.sigma[i] == pytest.approx(s)
        x = ref
    assert float(sched.sigmas[0]) == 1.0


class FlowClassifier:
    """A noisy classifier of the flow state: logits linear in x, modulated by t; records its calls."""

    def __init__(self, k=5):
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(IMAGE[1] * IMAGE[2] * IMAGE[3], k, generator=g) * 0.3
        self.calls = []

    def __call__(self, x, t):
        self.calls.append(t.clone())
        return (x.flatten(1) @ self.w) * (1.0 + t.reshape(-1, 1) / 1000.0)


def logit_discriminator(x, t, y=None):
    return torch.tanh(x.flatten(1)).mean(1) * 3.0 + t / 1000.0


def _grad(fn, x):
    with torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(leaf).sum(), leaf)
    return g


def test_classifier_and_discriminator_guidance_by_hand():
    # The networks see the flow state itself and t = s T; the DG window is in s; v -= s/(1-s) g; the s = 1
    # step calls no network.
    clf, y = FlowClassifier(), torch.tensor([1, 3])
    specs = [fastguide.ClassifierGuidance(clf, scale=1.5),
             fastguide.DiscriminatorGuidance(logit_discriminator, weight=0.8, t_min=0.2, t_max=0.9)]
    sched = make_scheduler(dict(shift=3.0), {}, 8)
    x = latents(IMAGE)
    for i, t in enumerate(sched.timesteps):
        mo = velocity_model(x, t)
        s = float(sched.sigmas[i])
        tt = torch.full((IMAGE[0],), float(t))
        g = torch.zeros_like(x)
        if s < 1.0:
            def objective(z):   # J = log softmax(logits)_y of the classifier's formula (tau1 = tau2 = 1)
                logits = (z.flatten(1) @ clf.w) * (1.0 + tt.reshape(-1, 1) / 1000.0)
                return 1.5 * torch.log_softmax(logits, 1)[torch.arange(2), y]
            g = _grad(objective, x)
            if 0.2 <= s <= 0.9:
                g = g + _grad(lambda z: 0.8 * logit_discriminator(z, tt).clamp(-11.5, 11.5), x)
        twin = copy.deepcopy(sched)
        ref = sched.step(pipeline_cfg(mo, 2.0) - (s / (1 - s) if s < 1 else 0.0) * g, t, x).prev_sample
        n_calls = len(clf.calls)
        got = fastguide.step(mo, t, x, scheduler=twin, guidance_scale=2.0, guidance=specs, y=y)
        assert len(clf.calls) == n_calls + (s < 1.0)
        if s < 1.0:
            assert torch.equal(clf.calls[-1], tt)
        assert rel_err(got, ref) <= STEP_TOL, (i, s)
        assert state_of(twin) == state_of(sched)
        x = ref


@pytest.mark.parametrize("config", [dict(shift=3.0), dict(stochastic_sampling=True)], ids=["ode", "stochastic"])
def test_x0_classifier_guidance_by_hand(config):
    # Ma et al. on flow: the classifier sees x0^ = x - s v (v CFG-combined) and its gradient enters as a score
    # correction, v -= s/(1-s) g, as fastguide.sample's flow Euler takes it.
    clf, y = FlowClassifier(), torch.tensor([2, 0])
    spec = fastguide.ClassifierGuidance(clf, input="x0", scale=0.8, tau2=0.5)
    sched = make_scheduler(config, {}, 7)
    x = latents(IMAGE)
    gen = torch.Generator().manual_seed(9)
    for i, t in enumerate(sched.timesteps):
        mo = velocity_model(x, t)
        s = float(sched.sigmas[i])
        v = pipeline_cfg(mo, 2.0)
        tt = torch.full((IMAGE[0],), float(t))
        g = torch.zeros_like(x)
        if s < 1.0:
            def objective(z):   # J = tau1 l_y - logsumexp(tau2 l)
                logits = (z.flatten(1) @ clf.w) * (1.0 + tt.reshape(-1, 1) / 1000.0)
                return 0.8 * (logits[torch.arange(2), y] - torch.logsumexp(0.5 * logits, 1))
            g = _grad(objective, x - s * v)
        twin, twin_gen = copy.deepcopy(sched), clone_gen(gen)
        ref = sched.step(v - (s / (1 - s) if s < 1 else 0.0) * g, t, x, generator=gen).prev_sample
        got = fastguide.step(mo, t, x, scheduler=twin, guidance_scale=2.0, guidance=[spec], y=y, generator=twin_gen)
        assert rel_err(got, ref) <= STEP_TOL, (i, s)
        assert torch.equal(twin_gen.get_state(), gen.get_state())
        x = ref


# ---------------------------------------------------------------------------------------------------
# Bad input: the right error naming the option, and nothing changed

def _sched(**config):
    return lambda: make_scheduler(config, {}, 6)


BAD = [
    # (id, scheduler factory, call overrides, error type, text the message must contain)
    ("integer-timestep", _sched(), dict(t=lambda s: 0), ValueError, "timestep"),
    ("timestep-not-in-schedule", _sched(), dict(t=lambda s: 123.25), ValueError, "timestep"),
    ("churn", _sched(), dict(s_churn=1.0), ValueError, "s_churn"),
    ("eta", _sched(), dict(eta=0.5), ValueError, "eta"),
    ("no-set-timesteps", lambda: FlowMatchEulerDiscreteScheduler(), dict(t=lambda s: s.timesteps[0]), ValueError,
     "set_timesteps"),
    ("past-the-end", lambda: _with_index(make_scheduler({}, {}, 6), 6), dict(t=lambda s: s.timesteps[-1]),
     ValueError, "scheduler"),
    ("guidance-inverted", _sched(invert_sigmas=True),
     dict(guidance=lambda: [fastguide.ClassifierGuidance(FlowClassifier())]), ValueError, "invert_sigmas"),
    ("x0-classifier-gamma", _sched(),
     dict(guidance=lambda: [fastguide.ClassifierGuidance(FlowClassifier(), input="x0", gamma=0.3)]), ValueError,
     "gamma"),
    ("scale-wrong-length", _sched(), dict(guidance_scale=torch.ones(3)), ValueError, "guidance_scale"),
]


def _with_index(sched, index):
    sched._step_index = index
    return sched


@pytest.mark.parametrize("case,make,over,exc,text", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_changes_nothing(case, make, over, exc, text):
    sched = make()
    x = latents(IMAGE)
    t = over["t"](sched) if "t" in over else sched.timesteps[1]
    mo = velocity_model(x, float(t) if not isinstance(t, int) else 500.0)
    gen, out = torch.Generator().manual_seed(0), torch.full(IMAGE, 7.0)
    kwargs = {k: v for k, v in over.items() if k not in ("t", "guidance")}
    if "guidance" in over:
        kwargs.update(guidance=over["guidance"](), y=torch.tensor([0, 1]))
    kwargs.setdefault("guidance_scale", 2.0)
    before, gen_before, x_before = state_of(sched), gen.get_state(), x.clone()
    with pytest.raises(exc) as info:
        fastguide.step(mo, t, x, scheduler=sched, generator=gen, out=out, **kwargs)
    assert text in str(info.value), str(info.value)
    assert state_of(sched) == before and torch.equal(gen.get_state(), gen_before)
    assert torch.equal(x, x_before) and torch.equal(out, torch.full(IMAGE, 7.0))


def test_g_mean_rejected_on_flow():
    sched = make_scheduler({}, {}, 4)
    x = latents(IMAGE)
    with pytest.raises(ValueError, match="g_mean"):
        scheduler_step(velocity_model(x, 1000.0), sched.timesteps[0], x, scheduler=sched, guidance_scale=2.0,
                       g_mean=torch.zeros_like(x))


# ---------------------------------------------------------------------------------------------------
# Inside torch.compile(fullgraph=True): one graph for the whole loop (the step counter is symbolic)

_COMPILE_SCHEDULER = None


def test_compiled_flow_step_has_one_graph_and_matches_eager():
    import torch._dynamo.testing
    global _COMPILE_SCHEDULER
    steps = 10    # more than dynamo's recompile limit of 8: a graph per step would fail with fullgraph=True

    def denoise(x, t, z):
        mo = torch.cat([0.5 * torch.tanh(x), 0.7 * torch.tanh(x) + t / 2000.0])   # [uncond; cond] velocity
        return fastguide.step(mo, t, x, scheduler=_COMPILE_SCHEDULER, guidance_scale=3.0, noise=z)

    results = []
    for compiled in (False, True):
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        fn = torch.compile(denoise, backend=counter, fullgraph=True) if compiled else denoise
        _COMPILE_SCHEDULER = make_scheduler(dict(stochastic_sampling=True, shift=3.0), {}, steps)
        if compiled:
            dropin.prepare(_COMPILE_SCHEDULER)
        g = torch.Generator().manual_seed(0)
        x = latents(TOKENS)
        for t in _COMPILE_SCHEDULER.timesteps:
            x = fn(x, t, torch.randn(x.shape, generator=g))
        assert _COMPILE_SCHEDULER.step_index == steps
        results.append(x)
        if compiled:
            assert counter.frame_count == 1
    assert rel_err(results[1], results[0]) <= LOOP_TOL


def test_step_cpu_benchmark_flow_rows_run_and_agree(capsys):
    # benchmarks/step_cpu.py --flow-only: every timed method is checked against the diffusers step first
    from pathlib import Path
    if not fastguide.backends()["cpp"]:
        pytest.skip("the benchmark times the cpp backend")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cpu.py"
    spec = importlib.util.spec_from_file_location("step_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--flow-only", "--flow-repeats", "2", "--no-csv"])
    out = capsys.readouterr().out
    for label in ("SD3 latent", "Flux tokens"):
        rows = [line.split() for line in out.splitlines() if line.startswith(label)]
        assert [r[2] for r in rows] == ["copy", "fg.step", "fg.tuple", "fused_op", "diffusers"]
        ops = {r[2]: r[-2] for r in rows}
        assert ops["fg.step"] == ops["fused_op"] == "1" and int(ops["diffusers"]) > 1
        assert ops["fg.tuple"] == "2"  # the output's allocation and the kernel
