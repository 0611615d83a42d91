"""The memo of checked drop-in calls (``fastguide.dropin.checked``): repeat calls of a loop skip the checks,
and no other call does. Every bad call made after good calls on the same scheduler meets the same error as on
a fresh scheduler, and calls that differ in a scale or a shape give the results of their own checks."""

from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, EulerAncestralDiscreteScheduler,  # noqa: E402
                       FlowMatchEulerDiscreteScheduler)

import fastguide  # noqa: E402
from fastguide.dropin.schedulers import scheduler_state  # noqa: E402

B, C, H, W = 2, 3, 4, 5


def _flow():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    return sched


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, H, W, generator=g), torch.randn(2 * B, C, H, W, generator=g)


def _good_call(sched, x, mo, **kwargs):
    sched._step_index = 3
    return fastguide.step(mo, sched.timesteps[3], x, scheduler=sched, guidance_scale=4.0, out=torch.empty_like(x),
                          **kwargs)


BAD_CALLS = {
    "bool scale": (dict(guidance_scale=True), TypeError, "guidance_scale"),
    "NaN scale": (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    "negative scale": (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
    "rescale above 1": (dict(guidance_rescale=2.0), ValueError, "guidance_rescale"),
    "out dtype": (dict(out=torch.empty(B, C, H, W, dtype=torch.float64)), TypeError, "out"),
    "out shape": (dict(out=torch.empty(B, C, H, W + 1)), ValueError, "out"),
    "B rows with a scale": (dict(model_output=torch.randn(B, C, H, W)), ValueError, "model_output"),
    "model_output dtype": (dict(model_output=torch.randn(2 * B, C, H, W, dtype=torch.float64)), TypeError,
                           "model_output"),
    "sample shape": (dict(sample=torch.randn(B, C, H + 1, W)), ValueError, "model_output"),
    "unknown backend": (dict(backend="nope"), ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_a_bad_call_after_good_ones_meets_the_checks(case):
    changes, error, word = BAD_CALLS[case]
    warm, fresh = _flow(), _flow()
    x, mo = _tensors()
    for _ in range(3):
        _good_call(warm, x, mo)
    assert len(list(scheduler_state(warm).checked.keys())) == 1
    kwargs = dict(guidance_scale=4.0, out=torch.empty_like(x))
    kwargs.update(changes)
    model_output, sample = kwargs.pop("model_output", mo), kwargs.pop("sample", x)
    for sched in (fresh, warm):
        sched._step_index = 3
        with pytest.raises(error, match=word):
            fastguide.step(model_output, sched.timesteps[3], sample, scheduler=sched, **kwargs)
        assert sched.step_index == 3  # nothing advanced


def test_repeat_calls_reuse_one_checked_entry_and_match_diffusers():
    ours = _flow()
    theirs = copy.deepcopy(ours)
    x, mo = _tensors(1)
    for i, t in enumerate(ours.timesteps):
        w = 2.0 if i % 2 else 5.0  # two scales: two entries, each reused
        u, c = mo.chunk(2)
        want = theirs.step(u + w * (c - u), t, x, return_dict=False)[0]
        got = fastguide.step(mo, t, x, scheduler=ours, guidance_scale=w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        x = want
    assert len(list(scheduler_state(ours).checked.keys())) == 2


def test_a_new_schedule_starts_an_empty_memo():
    sched = _flow()
    x, mo = _tensors()
    _good_call(sched, x, mo)
    old = scheduler_state(sched)
    sched.set_timesteps(8)
    assert scheduler_state(sched) is not old
    assert not list(scheduler_state(sched).checked.keys())


def test_calls_with_noise_or_tensor_scales_are_not_kept():
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(5)
    x, mo = _tensors()
    t = sched.timesteps[1]
    fastguide.step(mo, t, x, scheduler=sched, guidance_scale=3.0, noise=torch.zeros_like(x))
    fastguide.step(mo, t, x, scheduler=sched, guidance_scale=torch.full((B,), 3.0))
    assert not list(scheduler_state(sched).checked.keys())
    fastguide.step(mo, t, x, scheduler=sched, guidance_scale=3.0)
    assert len(list(scheduler_state(sched).checked.keys())) == 1


def _euler_ancestral():
    sched = EulerAncestralDiscreteScheduler()
    sched.set_timesteps(8)
    sched.is_scale_input_called = True
    return sched


BAD_GENERATORS = {
    "not a generator": (5, TypeError),
    "a list of the wrong length": ([torch.Generator()] * (B + 1), ValueError),
    "a list holding a non-generator": ([torch.Generator(), "seed"], TypeError),
}
SCHEDULERS = {"flow": _flow, "euler ancestral": _euler_ancestral}


@pytest.mark.parametrize("case", list(BAD_GENERATORS))
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a_generator_is_checked_on_every_call_though_not_in_the_key(case, name):
    """Calls with a generator share the memo (the checks' outcome does not depend on it), so a repeat call
    checks the generator itself: a bad one after good ones meets the error a fresh scheduler gives."""
    bad, error = BAD_GENERATORS[case]
    warm, fresh = SCHEDULERS[name](), SCHEDULERS[name]()
    x, mo = _tensors()
    for _ in range(3):
        _good_call(warm, x, mo, generator=torch.Generator().manual_seed(0))
    assert len(list(scheduler_state(warm).checked.keys())) == 1
    for sched in (fresh, warm):
        sched._step_index = 3
        with pytest.raises(error, match="generator"):
            fastguide.step(mo, sched.timesteps[3], x, scheduler=sched, guidance_scale=4.0, generator=bad,
                           out=torch.empty_like(x))
        assert sched.step_index == 3


def test_kept_generator_calls_draw_as_diffusers_draws():
    ours = _euler_ancestral()
    theirs = copy.deepcopy(ours)
    x, mo = _tensors(2)
    g_ours, g_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in ours.timesteps:
        u, c = mo.chunk(2)
        want = theirs.step(u + 4.0 * (c - u), t, x, generator=g_theirs, return_dict=False)[0]
        got = fastguide.step(mo, t, x, scheduler=ours, guidance_scale=4.0, generator=g_ours)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(list(scheduler_state(ours).checked.keys())) == 1
    assert torch.equal(g_ours.get_state(), g_theirs.get_state())


def test_a_bool_scale_never_passes_for_the_number_it_equals():
    """True == 1 and hash(True) == hash(1): a memo keyed by value alone would let True through after a 1."""
    sched = _flow()
    x, mo = _tensors()
    for scale in (1.0, 1):
        sched._step_index = 3
        fastguide.step(mo, sched.timesteps[3], x, scheduler=sched, guidance_scale=scale)
    sched._step_index = 3
    with pytest.raises(TypeError, match="guidance_scale"):
        fastguide.step(mo, sched.timesteps[3], x, scheduler=sched, guidance_scale=True)
