"""fastguide.step on diffusers' FlowMatchHeunDiscreteScheduler, against the real scheduler.

Its ``step`` alternates a first stage (Euler, storing ``prev_derivative``, ``dt`` and ``sample`` on the
scheduler) and a second stage (the Heun correction from what is stored). Teacher-forced parity runs each step of
a short CFG loop on a deep copy of the scheduler through fastguide.step, so every second stage reads what
diffusers' own first stage stored, and compares the result, the stored state (``dt`` bit for bit) and the
generator. Whole loops then switch between the two every step and every third step, so each side's second stage
reads the other's first stage. Return types, half precision and bad input follow.
"""

from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchHeunDiscreteScheduler  # noqa: E402
from diffusers.schedulers.scheduling_flow_match_heun_discrete import (  # noqa: E402
    FlowMatchHeunDiscreteSchedulerOutput)

import fastguide  # noqa: E402
from fastguide import dropin  # noqa: E402

from test_dropin_diffusers import clone_gen, rel_err  # noqa: E402
from test_dropin_diffusers import diffusers_cfg as pipeline_cfg  # noqa: E402  (CFG + rescale_noise_cfg)

IMAGE = (2, 4, 6, 6)      # [B, C, H, W] latents
TOKENS = (2, 12, 8)       # [B, L, D] packed latents
STEP_TOL = 1e-5           # relative to the reference's largest magnitude, one step from identical inputs
LOOP_TOL = 1e-4           # whole free-running loops
CPU_BACKENDS = [b for b in ("torch", "cpp") if fastguide.backends()[b]]
PER_SAMPLE = "per-sample"

pytestmark = pytest.mark.usefixtures("one_thread")


def velocity_model(x: torch.Tensor, t) -> torch.Tensor:
    """[uncond; cond] velocities for latents of any shape at timestep t (= s * T); the halves differ."""
    s = float(t) / 1000.0
    base = 0.8 * torch.tanh(0.7 * x) - 0.4 * x.roll(1, dims=-1) * (1.0 - s) + 0.3 * s
    cond = base + 0.3 * torch.cos(1.3 * x + 2.0 * s) - 0.2
    return torch.cat([base, cond])


def latents(shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make_scheduler(steps: int, **config) -> FlowMatchHeunDiscreteScheduler:
    sched = FlowMatchHeunDiscreteScheduler(**config)
    sched.set_timesteps(steps)
    return sched


def index_state(s) -> dict:
    return {"step_index": s._step_index, "begin_index": s._begin_index, "first_order": s.state_in_first_order}


def assert_same_stored_state(ours, theirs) -> None:
    """The stage state FlowMatchHeunDiscreteScheduler keeps between its two calls."""
    assert index_state(ours) == index_state(theirs)
    if theirs.dt is None:
        assert ours.dt is None and ours.prev_derivative is None and getattr(ours, "sample", None) is None
        return
    assert isinstance(ours.dt, torch.Tensor) and ours.dt.dtype == theirs.dt.dtype and ours.dt.shape == ()
    assert torch.equal(ours.dt, theirs.dt)
    assert rel_err(ours.sample, theirs.sample) <= STEP_TOL
    # diffusers' derivative (x - (x - s v)) / s cancels in fp32 at small s (an error of ulp(x) / s); what the
    # second stage makes of it is dt times that, dt <= s
    gap = (ours.prev_derivative.double() - theirs.prev_derivative.double()).abs().max() * theirs.dt.abs().item()
    assert gap <= STEP_TOL * theirs.sample.abs().max().item()


# ---------------------------------------------------------------------------------------------------
# Teacher-forced parity, step by step

CONFIGS = [
    # (id, scheduler config, steps, call options, latent shape)
    ("default", dict(), 10, dict(), IMAGE),
    ("shift3", dict(shift=3.0), 12, dict(), IMAGE),
    ("shift3-per-sample-tokens", dict(shift=3.0), 10, dict(scale=PER_SAMPLE), TOKENS),
    ("rescale", dict(shift=3.0), 8, dict(rescale=0.7), IMAGE),
    ("shift5-tokens-rescale-per-sample", dict(shift=5.0), 10, dict(scale=PER_SAMPLE, rescale=0.3), TOKENS),
    ("no-cfg", dict(shift=2.0, num_train_timesteps=500), 8, dict(scale=None), TOKENS),
    ("churn", dict(shift=3.0), 8, dict(s_churn=3.0), IMAGE),
    ("churn-window-tokens", dict(shift=3.0), 10, dict(s_churn=8.0, s_tmin=0.2, s_tmax=0.8, s_noise=1.05), TOKENS),
]


def _scale(opts: dict):
    scale = opts.get("scale", 5.0)
    return torch.tensor([3.0, 6.5]) if scale == PER_SAMPLE else scale


def _churn(opts: dict) -> dict:
    return {k: v for k, v in opts.items() if k.startswith("s_")}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,config,steps,opts,shape", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_teacher_forced_parity(name, config, steps, opts, shape, backend):
    scale, rescale, churn = _scale(opts), opts.get("rescale", 0.0), _churn(opts)
    sched = make_scheduler(steps, **config)
    x = latents(shape)
    gen = torch.Generator().manual_seed(1234)
    for i, t in enumerate(sched.timesteps):
        mo = velocity_model(x, t)
        if scale is None:   # a plain B-row velocity
            mo = mo[shape[0]:]
        twin, twin_gen = copy.deepcopy(sched), clone_gen(gen)   # a second stage reads diffusers' first stage
        ref = sched.step(pipeline_cfg(mo, scale, rescale) if scale is not None else mo, t, x, generator=gen,
                         **churn)
        got = fastguide.step(mo, t, x, scheduler=twin, guidance_scale=scale, guidance_rescale=rescale,
                             generator=twin_gen, return_dict=True, backend=backend, **churn)
        assert type(got) is type(ref) is FlowMatchHeunDiscreteSchedulerOutput
        assert rel_err(got.prev_sample, ref.prev_sample) <= STEP_TOL, f"{name} step {i}"
        assert_same_stored_state(twin, sched)
        assert torch.equal(twin_gen.get_state(), gen.get_state()), "churn noise drawn differently from diffusers"
        x = ref.prev_sample
    assert sched.step_index == len(sched.timesteps) and not sched.state_in_first_order  # diffusers' ending


def test_churn_noise_argument_is_diffusers_draw():
    # noise= replaces the generator's draw on the steps that churn (first and second stages alike)
    sched = make_scheduler(6, shift=3.0)
    ours = copy.deepcopy(sched)
    x = latents(IMAGE)
    for t in sched.timesteps:
        mo = velocity_model(x, t)
        z = torch.randn(IMAGE, generator=torch.Generator().manual_seed(int(t)))
        ref = sched.step(pipeline_cfg(mo, 2.0), t, x, s_churn=4.0,
                         generator=torch.Generator().manual_seed(int(t))).prev_sample
        got = fastguide.step(mo, t, x, scheduler=ours, guidance_scale=2.0, s_churn=4.0, noise=z)
        assert rel_err(got, ref) <= STEP_TOL
        x = ref


# ---------------------------------------------------------------------------------------------------
# Whole loops, switching between scheduler.step and fastguide.step mid-loop

def run_loop(make, mode, shape=IMAGE, scale=4.0, churn=None, begin=None, in_place=False, generators=None):
    """A whole loop; ``mode(i)`` says whether call i uses fastguide.step (True) or scheduler.step."""
    sched = make()
    x = latents(shape, seed=3)
    timesteps = sched.timesteps
    if begin is not None:   # img2img: start part-way down the schedule
        sched.set_begin_index(begin)
        timesteps = timesteps[begin:]
        x = sched.scale_noise(latents(shape, seed=5), timesteps[0], x)
    gen = [torch.Generator().manual_seed(s) for s in generators] if generators else \
        torch.Generator().manual_seed(99)
    for i, t in enumerate(timesteps):
        mo = velocity_model(x, t)
        if mode(i):
            x = fastguide.step(mo, t, x, scheduler=sched, guidance_scale=scale, generator=gen,
                               out=x if in_place else None, **(churn or {}))
        else:
            x = sched.step(pipeline_cfg(mo, scale), t, x, generator=gen, **(churn or {})).prev_sample
    return x, sched, gen


LOOPS = [
    ("shift3", lambda: make_scheduler(16, shift=3.0), dict()),
    ("tokens-per-sample", lambda: make_scheduler(12, shift=5.0), dict(shape=TOKENS, scale=torch.tensor([2.0, 5.0]))),
    ("churn-generator-list", lambda: make_scheduler(12, shift=3.0),
     dict(churn=dict(s_churn=6.0, s_tmax=0.9), generators=(5, 6))),
    ("img2img-in-place", lambda: make_scheduler(14, shift=3.0), dict(begin=6, in_place=True)),
]
SWITCHES = [("fastguide-first-stages", lambda i: i % 2 == 0), ("fastguide-second-stages", lambda i: i % 2 == 1),
            ("every-third", lambda i: i % 3 == 1)]


@pytest.mark.parametrize("name,make,kw", LOOPS, ids=[c[0] for c in LOOPS])
def test_whole_loop_and_switching(name, make, kw):
    ref, ref_sched, ref_gen = run_loop(make, lambda i: False, **kw)
    for label, mode in [("fastguide", lambda i: True)] + SWITCHES:
        got, got_sched, got_gen = run_loop(make, mode, **kw)
        assert rel_err(got, ref) <= LOOP_TOL, label
        assert index_state(got_sched) == index_state(ref_sched), label
        gens = zip(got_gen, ref_gen) if isinstance(ref_gen, list) else [(got_gen, ref_gen)]
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in gens), label


def test_in_place_first_stage_keeps_the_sample():
    # out=sample overwrites the latents: the scheduler must keep the first stage's input, as diffusers does
    sched = make_scheduler(5, shift=3.0)
    theirs = copy.deepcopy(sched)
    x = latents(IMAGE)
    t = sched.timesteps[0]
    mo = velocity_model(x, t)
    ref = theirs.step(pipeline_cfg(mo, 3.0), t, x.clone()).prev_sample
    before = x.clone()
    res = fastguide.step(mo, t, x, scheduler=sched, guidance_scale=3.0, out=x)
    assert res is x and rel_err(x, ref) <= STEP_TOL
    assert torch.equal(sched.sample, before) and sched.sample is not x


# ---------------------------------------------------------------------------------------------------
# Return types, half precision, prepare

def test_return_dict_modes():
    sched = make_scheduler(4, shift=3.0)
    theirs = copy.deepcopy(sched)
    x = latents(TOKENS)
    for i, t in enumerate(sched.timesteps):
        v = velocity_model(x, t)[TOKENS[0]:]
        want = theirs.step(v, t, x, return_dict=False)
        mode = (None, False, True)[i % 3]
        got = fastguide.step(v, t, x, scheduler=sched, return_dict=mode)
        if mode is None:
            assert isinstance(got, torch.Tensor)
        elif mode is False:
            assert isinstance(got, tuple) and len(got) == len(want) == 1
            got = got[0]
        else:
            assert type(got) is FlowMatchHeunDiscreteSchedulerOutput
            got = got.prev_sample
        assert rel_err(got, want[0]) <= STEP_TOL
        x = want[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    # diffusers upcasts the sample to fp32, keeps an fp32 sample / derivative and rounds the result to the model
    # output's dtype; fastguide keeps them in the sample's dtype: equal to half precision
    sched = make_scheduler(6, shift=3.0)
    x = latents(IMAGE, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    for t in sched.timesteps:
        mo = velocity_model(x.float(), t).to(dtype)
        twin, twin_gen = copy.deepcopy(sched), clone_gen(gen)
        ref = sched.step(pipeline_cfg(mo, 3.0), t, x, generator=gen, s_churn=2.0).prev_sample
        got = fastguide.step(mo, t, x, scheduler=twin, guidance_scale=3.0, generator=twin_gen, s_churn=2.0)
        assert got.dtype == ref.dtype == dtype
        assert rel_err(got, ref) <= 2e-2
        assert torch.equal(twin_gen.get_state(), gen.get_state())
        x = ref


def test_prepare_and_plan():
    sched = make_scheduler(5, shift=3.0)
    plan = dropin.prepare(sched, "cpu")
    n = len(sched.timesteps)
    assert plan.kind == "flow_match_heun" and plan.num_steps == n == 9 and plan.rows.shape[0] == 2 * n
    assert dropin.plan_for(sched) is plan
    assert dropin.plan_for(sched, s_churn=1.0) is not plan


# ---------------------------------------------------------------------------------------------------
# Bad input: the right error naming the option, and nothing changed

class TinyClassifier(torch.nn.Module):
    def forward(self, x, t):
        return x.flatten(1)[:, :3]


def _second_stage(steps=6):
    """A scheduler right after diffusers' first stage of step 0 (without churn)."""
    sched = make_scheduler(steps, shift=3.0)
    x = latents(IMAGE)
    sched.step(pipeline_cfg(velocity_model(x, sched.timesteps[0]), 2.0), sched.timesteps[0], x)
    return sched


def _broken(name, value):
    def make():
        sched = _second_stage()
        setattr(sched, name, value)
        return sched
    return make


BAD = [
    # (id, scheduler factory, call overrides, error type, text the message must contain)
    ("integer-timestep", lambda: make_scheduler(6), dict(t=lambda s: 0), ValueError, "timestep"),
    ("eta", lambda: make_scheduler(6), dict(eta=0.5), ValueError, "eta"),
    ("no-set-timesteps", FlowMatchHeunDiscreteScheduler, dict(t=lambda s: s.timesteps[0]), ValueError,
     "set_timesteps"),
    ("past-the-end", lambda: _with_index(make_scheduler(3), 5), dict(t=lambda s: s.timesteps[-1]), ValueError,
     "past the end"),
    ("x0-classifier-guidance", lambda: make_scheduler(6),
     dict(guidance=lambda: [fastguide.ClassifierGuidance(TinyClassifier(), input="x0")]), ValueError, "input='x0'"),
    ("stored-sample-missing", _broken("sample", None), dict(), ValueError, "scheduler.sample"),
    ("stored-derivative-shape", _broken("prev_derivative", torch.zeros(1, 4, 6, 6)), dict(), ValueError,
     "scheduler.prev_derivative"),
    ("churn-differs-between-stages", _second_stage, dict(s_churn=5.0), ValueError, "s_churn"),
    ("scale-wrong-length", lambda: make_scheduler(6), dict(guidance_scale=torch.ones(3)), ValueError,
     "guidance_scale"),
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
    stored = (sched._step_index, getattr(sched, "dt", None), getattr(sched, "sample", None),
              getattr(sched, "prev_derivative", None))
    gen_before, x_before = gen.get_state(), x.clone()
    with pytest.raises(exc) as info:
        fastguide.step(mo, t, x, scheduler=sched, generator=gen, out=out, **kwargs)
    assert text in str(info.value), str(info.value)
    after = (sched._step_index, getattr(sched, "dt", None), getattr(sched, "sample", None),
             getattr(sched, "prev_derivative", None))
    assert all(a is b for a, b in zip(after, stored)) and torch.equal(gen.get_state(), gen_before)
    assert torch.equal(x, x_before) and torch.equal(out, torch.full(IMAGE, 7.0))


def test_refused_inside_torch_compile(monkeypatch):
    # (checked without compiling: the stage state lives on the scheduler, so tracing is refused up front)
    sched = make_scheduler(4)
    dropin.prepare(sched, "cpu")
    x = latents(IMAGE)
    t = sched.timesteps[0]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="FlowMatchHeunDiscreteScheduler"):
        fastguide.step(velocity_model(x, t), t, x, scheduler=sched, guidance_scale=2.0)
    monkeypatch.undo()
    assert sched.step_index is None and sched.dt is None


def test_classifier_and_discriminator_guidance_by_hand():
    """Each stage's velocity is corrected on the state the model sees, v -= s/(1-s) g (t = s T; the DG window
    in s): the result is diffusers' own stage on that velocity, and the stored derivative is the corrected
    one. The first stage at s = 1 calls no network."""
    clf = TinyClassifier()
    y = torch.tensor([1, 2])
    specs = [fastguide.ClassifierGuidance(clf, scale=1.5),
             fastguide.DiscriminatorGuidance(lambda x, t, yy=None: torch.tanh(x.flatten(1)).mean(1) * 3.0,
                                             weight=0.8, t_min=0.2, t_max=0.9)]
    sched = make_scheduler(5, shift=3.0)
    x = latents(IMAGE)
    for i, t in enumerate(sched.timesteps):
        mo = velocity_model(x, t)
        s = float(sched.sigmas[i])
        g = torch.zeros_like(x)
        if s < 1.0:
            with torch.enable_grad():
                leaf = x.detach().clone().requires_grad_(True)
                obj = 1.5 * torch.log_softmax(clf(leaf, torch.full((2,), float(t))), 1)[torch.arange(2), y]
                if 0.2 <= s <= 0.9:
                    obj = obj + 0.8 * (torch.tanh(leaf.flatten(1)).mean(1) * 3.0).clamp(-11.5, 11.5)
                (g,) = torch.autograd.grad(obj.sum(), leaf)
        twin = copy.deepcopy(sched)
        ref = sched.step(pipeline_cfg(mo, 2.0) - (s / (1 - s) if s < 1 else 0.0) * g, t, x).prev_sample
        got = fastguide.step(mo, t, x, scheduler=twin, guidance_scale=2.0, guidance=specs, y=y)
        assert rel_err(got, ref) <= STEP_TOL, (i, s)
        for name in ("prev_derivative", "sample"):
            mine, theirs = getattr(twin, name), getattr(sched, name)
            assert (mine is None) == (theirs is None) and (mine is None or rel_err(mine, theirs) <= STEP_TOL)
        x = ref

