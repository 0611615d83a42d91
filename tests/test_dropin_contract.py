"""fastguide.step behaves as ``scheduler.step`` does, call for call: the same return values (tuple or the
scheduler's own output class), every timestep the scheduler accepts, and NaN exactly where diffusers gives
NaN on degenerate configs."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler)

import fastguide  # noqa: E402

B, C, H, W = 2, 3, 4, 4
SCHEDULERS = [
    ("DDPMScheduler", lambda: DDPMScheduler(clip_sample=False), ("prev_sample", "pred_original_sample")),
    ("DDIMScheduler", lambda: DDIMScheduler(clip_sample=False), ("prev_sample", "pred_original_sample")),
    ("EulerDiscreteScheduler", EulerDiscreteScheduler, ("prev_sample", "pred_original_sample")),
    ("EulerAncestralDiscreteScheduler", EulerAncestralDiscreteScheduler, ("prev_sample", "pred_original_sample")),
    ("DPMSolverMultistepScheduler", DPMSolverMultistepScheduler, ("prev_sample",)),
]


def _outputs(x, t):
    g = torch.Generator().manual_seed(int(t) + 7)
    return torch.randn((2 * B,) + tuple(x.shape[1:]), generator=g)


def _cfg(mo, w):
    u, c = mo.chunk(2)
    return u + w * (c - u)


def _pair(make):
    sched = make()
    sched.set_timesteps(6)
    return sched, copy.deepcopy(sched)


def _quiet_step(sched, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sched.step(*args, **kwargs)


@pytest.mark.parametrize("name,make,fields", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_return_dict_false_is_the_schedulers_tuple(name, make, fields):
    ours, theirs = _pair(make)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps[:3]:
        mo = _outputs(x, t)
        want = _quiet_step(theirs, _cfg(mo, 3.0), t, x, generator=torch.Generator().manual_seed(1),
                           return_dict=False)
        got = fastguide.step(mo, t, x, scheduler=ours, guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(1), return_dict=False)
        assert isinstance(got, tuple) and len(got) == len(want) == len(fields)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        x = got[0]   # the very common ...step(..., return_dict=False)[0] is the sample


@pytest.mark.parametrize("name,make,fields", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_return_dict_true_is_the_schedulers_output_class(name, make, fields):
    ours, theirs = _pair(make)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(0))
    t = ours.timesteps[0]
    mo = _outputs(x, t)
    want = _quiet_step(theirs, _cfg(mo, 2.0), t, x, generator=torch.Generator().manual_seed(3))
    got = fastguide.step(mo, t, x, scheduler=ours, guidance_scale=2.0, generator=torch.Generator().manual_seed(3),
                         return_dict=True)
    assert type(got) is type(want)
    for field in fields:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-4, atol=1e-5)
    assert got[0] is got.prev_sample and len(got.to_tuple()) == len(fields)


def test_return_dict_unset_returns_the_tensor():
    sched, _ = _pair(lambda: DDIMScheduler(clip_sample=False))
    x = torch.randn(B, C, H, W)
    t = sched.timesteps[0]
    got = fastguide.step(_outputs(x, t), t, x, scheduler=sched, guidance_scale=2.0)
    assert isinstance(got, torch.Tensor) and got.shape == x.shape


@pytest.mark.parametrize("t", [1, 5, 999, 0, 333])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_accepts_timesteps_outside_its_schedule(t, eta):
    ours, theirs = _pair(lambda: DDIMScheduler(clip_sample=False))
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(2))
    mo = _outputs(x, t)
    want = theirs.step(_cfg(mo, 1.5), t, x, eta=eta, generator=torch.Generator().manual_seed(4))
    got = fastguide.step(mo, t, x, scheduler=ours, guidance_scale=1.5, eta=eta,
                         generator=torch.Generator().manual_seed(4), return_dict=True)
    torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.pred_original_sample, want.pred_original_sample, rtol=1e-4, atol=1e-5)
    # an in-schedule timestep afterwards still uses the schedule's own row
    t2 = ours.timesteps[2]
    torch.testing.assert_close(fastguide.step(mo, t2, x, scheduler=ours, guidance_scale=1.5),
                               theirs.step(_cfg(mo, 1.5), t2, x).prev_sample, rtol=1e-4, atol=1e-5)


def test_ddim_timestep_outside_the_training_range_is_refused():
    sched, _ = _pair(lambda: DDIMScheduler(clip_sample=False))
    x = torch.randn(B, C, H, W)
    for bad in (-1, 1000, 2.5):
        with pytest.raises(ValueError, match="timestep"):
            fastguide.step(_outputs(x, 0), bad, x, scheduler=sched, guidance_scale=1.5)


def test_degenerate_euler_ancestral_config_gives_nan_where_diffusers_does():
    """Zero-SNR rescaling over 1100 training steps makes the first sigma smaller than the second: diffusers'
    step 0 is NaN and the others finite; fastguide builds all rows up front and must do the same."""
    make = lambda: EulerAncestralDiscreteScheduler(num_train_timesteps=1100, rescale_betas_zero_snr=True)  # noqa
    ours, theirs = make(), make()
    ours.set_timesteps(1100)
    theirs.set_timesteps(1100)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(5))
    for i in (0, 1, 2):
        t = ours.timesteps[i]
        mo = _outputs(x, t)
        x_in = ours.scale_model_input(x, t)
        theirs.scale_model_input(x, t)
        want = theirs.step(_cfg(mo, 2.0), t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        got = fastguide.step(mo, t, x, scheduler=ours, guidance_scale=2.0, generator=torch.Generator().manual_seed(i))
        assert x_in.shape == x.shape
        assert torch.isfinite(got).all() == torch.isfinite(want).all()
        if torch.isfinite(want).all():
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
        x = want if torch.isfinite(want).all() else torch.randn(B, C, H, W)
    rows = fastguide.dropin.plan_for(ours).rows
    assert not np.isfinite(rows[0]).all() and np.isfinite(rows[1:]).all()
