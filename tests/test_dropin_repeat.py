"""The repeat lane of the drop-in (``fastguide.dropin.repeat``): once a plain call has run, its repeat calls run
the filled C++ argument block directly. They give the bits of the general path, advance the scheduler as it
does, meet its errors, and leave the lane for the general path whenever they cannot be run as they come."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)

import fastguide  # noqa: E402
from fastguide.core import hooks  # noqa: E402
from fastguide.core import ops as core_ops  # noqa: E402
from fastguide.dropin import repeat  # noqa: E402
from fastguide.dropin.schedulers import STATE_ATTR, scheduler_state  # noqa: E402
from fastguide.tools.opcount import OpCounter  # noqa: E402

pytestmark = pytest.mark.skipif(not fastguide.backends()["cpp"], reason="the C++ CPU backend is not built")

W = 4.5


def _flow(steps: int = 10, **config):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, **config)
    sched.set_timesteps(steps)
    return sched


def _ddim(steps: int = 10, **config):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **config)
    sched.set_timesteps(steps)
    return sched


def _general_runs(monkeypatch) -> list:
    """A list that gets an entry for every call taking the general path (its fused step)."""
    runs = []
    real = core_ops.run_step

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(core_ops, "run_step", counted)
    return runs


def _lane_of(sched):
    lanes = [memo.lane for memo in scheduler_state(sched).checked._data.values()]
    assert len(lanes) == 1
    return lanes[0]


def _loop(sched, shape, dtype, out_mode: str, seed: int, batch_scale=None):
    """A whole CFG loop through ``fastguide.step``; returns the outputs of every step (poisoned out buffers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    results = []
    for t in sched.timesteps:
        mo = torch.randn((2 * shape[0],) + tuple(shape[1:]), generator=g).to(dtype)
        out = None if out_mode == "none" else x if out_mode == "sample" else torch.full_like(x, float("nan"))
        x = fastguide.step(mo, t, x, scheduler=sched, guidance_scale=W if batch_scale is None else batch_scale,
                           out=out)
        results.append(x.clone())
    return results


CASES = {
    "flow SD3 latent": (lambda: _flow(), (2, 4, 6, 10), torch.float32),
    "flow tokens": (lambda: _flow(), (2, 7, 12), torch.float32),
    "flow dynamic shift": (lambda: _flow_mu(), (1, 3, 5, 5), torch.float32),
    "flow fp16": (lambda: _flow(), (2, 3, 8, 8), torch.float16),
    "flow bf16": (lambda: _flow(), (3, 3, 7, 5), torch.bfloat16),
    "ddim": (lambda: _ddim(), (2, 4, 8, 8), torch.float32),
    "ddim clip v": (lambda: _ddim(clip_sample=True, prediction_type="v_prediction"), (2, 4, 5, 5), torch.float32),
    "ddim fp16": (lambda: _ddim(), (1, 4, 8, 8), torch.float16),
    "euler": (lambda: _euler(), (2, 4, 6, 6), torch.float32),
    "euler karras v": (lambda: _euler(use_karras_sigmas=True, prediction_type="v_prediction"), (3, 2, 5, 7),
                       torch.float32),
}


def _euler(steps: int = 10, **config):
    """EulerDiscreteScheduler without churn draws no noise: its steps take the lane too. Its input is marked
    scaled as a pipeline's ``scale_model_input`` leaves it (the warning otherwise, on the lane too:
    ``test_dropin_diffusers.py::test_warns_like_diffusers_when_scale_model_input_was_never_called``)."""
    sched = EulerDiscreteScheduler(**config)
    sched.set_timesteps(steps)
    sched.is_scale_input_called = True
    return sched


def _flow_mu():
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift_terminal=0.1)
    sched.set_timesteps(9, mu=0.8)
    return sched


@pytest.mark.parametrize("out_mode", ["buffer", "sample", "none"])
@pytest.mark.parametrize("case", list(CASES))
def test_lane_gives_the_general_paths_bits_step_for_step(case, out_mode, monkeypatch):
    make, shape, dtype = CASES[case]
    on_lane, general = make(), make()
    runs = _general_runs(monkeypatch)
    got = _loop(on_lane, shape, dtype, out_mode, seed=3)
    assert len(runs) == 1  # the first call built the lane, the others ran on it
    assert isinstance(_lane_of(on_lane), repeat.Lane)
    monkeypatch.setattr(repeat, "run", lambda *args, **kwargs: None)
    want = _loop(general, shape, dtype, out_mode, seed=3)
    assert len(runs) == 1 + len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert getattr(on_lane, "_step_index", None) == getattr(general, "_step_index", None)
    assert scheduler_state(on_lane).next_index == scheduler_state(general).next_index


def _pipeline_loop(sched, return_dict: bool, seed: int) -> list:
    """A loop as the diffusers pipelines call the scheduler: a generator and ``return_dict``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 6, 6, generator=g)
    gen = torch.Generator().manual_seed(7)
    results = []
    for t in sched.timesteps:
        mo = torch.randn(4, 4, 6, 6, generator=g)
        res = fastguide.step(mo, t, x, scheduler=sched, guidance_scale=W, generator=gen, return_dict=return_dict)
        fields = res if not return_dict else tuple(res.values())
        results.append((type(res), [f.clone() for f in fields]))
        x = fields[0]
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(7).get_state())  # nothing drawn
    return results


@pytest.mark.parametrize("return_dict", [False, True])
@pytest.mark.parametrize("case", ["flow SD3 latent", "ddim", "ddim clip v"])
def test_lane_takes_pipeline_calls_with_a_generator_and_return_dict(case, return_dict, monkeypatch):
    make = CASES[case][0]
    on_lane, general = make(), make()
    runs = _general_runs(monkeypatch)
    got = _pipeline_loop(on_lane, return_dict, seed=4)
    assert len(runs) == 1
    monkeypatch.setattr(repeat, "run", lambda *args, **kwargs: None)
    want = _pipeline_loop(general, return_dict, seed=4)
    for (got_type, got_fields), (want_type, want_fields) in zip(got, want):
        assert got_type is want_type
        assert len(got_fields) == len(want_fields) == (1 if case.startswith("flow") else 2)
        for a, b in zip(got_fields, want_fields):
            assert torch.equal(a, b)


# Euler's state is in sigma units (up to ~15 here), so its fp32 rounding against diffusers' reaches ~6e-5 over
# a loop: the drop-in suite's whole-loop tolerance.
@pytest.mark.parametrize("make, tol", [(_flow, 2e-5), (_ddim, 2e-5), (_euler, 1e-4)], ids=["flow", "ddim", "euler"])
def test_lane_loop_matches_diffusers_and_per_sample_scales(make, tol):
    ours = make()
    theirs = copy.deepcopy(ours)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    y = x.clone()
    scales = torch.tensor([1.0, 4.0, 7.5])
    for t in ours.timesteps:
        mo = torch.randn(6, 4, 8, 8, generator=g)
        u, c = mo.chunk(2)
        y = theirs.step(u + scales.view(-1, 1, 1, 1) * (c - u), t, y, return_dict=False)[0]
        x = fastguide.step(mo, t, x, scheduler=ours, guidance_scale=scales, out=x)
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
    assert getattr(ours, "_step_index", None) == getattr(theirs, "_step_index", None)


def _warm(sched, shape=(2, 3, 4, 4)):
    """Two calls on ``sched`` at steps 0 and 1 (the lane exists after the first); returns (x, model output)."""
    g = torch.Generator().manual_seed(1)
    x, mo = torch.randn(shape, generator=g), torch.randn((2 * shape[0],) + shape[1:], generator=g)
    for t in sched.timesteps[:2]:
        fastguide.step(mo, t, x, scheduler=sched, guidance_scale=W, out=torch.empty_like(x))
    assert isinstance(_lane_of(sched), repeat.Lane)
    return x, mo


def _reference_step(sched, mo, t, x):
    """The same step on a copy of ``sched`` through the general path (a fresh state: no memo, no lane)."""
    fresh = copy.deepcopy(sched)
    delattr(fresh, STATE_ATTR)
    return fastguide.step(mo, t, x, scheduler=fresh, guidance_scale=W, return_dict=False)[0], fresh


def _overlapping_out(x, mo):
    return mo[1:1 + x.shape[0]]      # a contiguous view over rows of the model output


FALLBACKS = {
    "strided sample": dict(sample=lambda x, mo: torch.randn(x.shape[::-1]).permute(3, 2, 1, 0)),
    "strided model output": dict(mo=lambda x, mo: mo.transpose(2, 3).contiguous().transpose(2, 3)),
    "out over the model output": dict(out=_overlapping_out),
    "strided out": dict(out=lambda x, mo: torch.empty(x.shape[::-1]).permute(3, 2, 1, 0)),
    "torch backend": dict(backend="torch"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_calls_the_lane_cannot_take_run_on_the_general_path(case, monkeypatch):
    sched = _flow()
    x, mo = _warm(sched)
    change = FALLBACKS[case]
    x = change["sample"](x, mo) if "sample" in change else x
    mo = change["mo"](x, mo) if "mo" in change else mo
    out = change["out"](x, mo) if "out" in change else torch.empty(x.shape)
    t = sched.timesteps[2]
    want, fresh = _reference_step(sched, mo.clone(), t, x.clone())
    runs = _general_runs(monkeypatch)
    got = fastguide.step(mo, t, x, scheduler=sched, guidance_scale=W, out=out, backend=change.get("backend", "auto"))
    assert len(runs) == 1
    assert got is out
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sched.step_index == fresh.step_index == 3


def test_a_ddim_timestep_off_the_schedule_takes_the_general_path(monkeypatch):
    sched = _ddim()
    x, mo = _warm(sched)
    theirs = copy.deepcopy(sched)
    runs = _general_runs(monkeypatch)
    got = fastguide.step(mo, 7, x, scheduler=sched, guidance_scale=W)
    u, c = mo.chunk(2)
    want = theirs.step(u + W * (c - u), 7, x, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(runs) == 1


def test_lane_initialises_the_step_index_as_the_general_path_does():
    sched = _flow()
    x, mo = _warm(sched)
    theirs = copy.deepcopy(sched)
    for s in (sched, theirs):
        s._step_index = None
    t = sched.timesteps[5]
    got = fastguide.step(mo, t, x, scheduler=sched, guidance_scale=W)
    u, c = mo.chunk(2)
    want = theirs.step(u + W * (c - u), t, x, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sched.step_index == theirs.step_index == 6


BAD = {
    "integer index": (dict(timestep=3), ValueError, "not an integer index"),
    "unknown backend": (dict(backend="nope"), ValueError, "backend"),
    "cpu-only backend forced off": (dict(backend="cuda"), (RuntimeError, ValueError), "cuda"),
    "timestep not in the schedule": (dict(timestep=torch.tensor(0.5)), ValueError, "not in scheduler.timesteps"),
    "generator list of the wrong length": (dict(generator=[torch.Generator()] * 3), ValueError, "generator"),
    "not a generator": (dict(generator=1), TypeError, "generator"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_calls_after_the_lane_exists_meet_the_general_paths_errors(case):
    changes, error, word = BAD[case]
    warm = _flow()
    fresh = _flow()
    x, mo = _warm(warm)
    for sched in (fresh, warm):
        sched._step_index = None if case == "timestep not in the schedule" else 2
        out = torch.full_like(x, 7.0)
        with pytest.raises(error, match=word):
            fastguide.step(mo, changes.get("timestep", sched.timesteps[2]), x, scheduler=sched, guidance_scale=W,
                           out=out, backend=changes.get("backend", "auto"), generator=changes.get("generator"))
        assert torch.all(out == 7.0)   # nothing written
    assert warm.step_index == fresh.step_index


def test_past_the_end_of_the_schedule_raises_on_the_lane_too():
    sched = _flow(4)
    x, mo = _warm(sched)
    sched._step_index = 4
    with pytest.raises(ValueError, match="past the end"):
        fastguide.step(mo, sched.timesteps[3], x, scheduler=sched, guidance_scale=W)


@pytest.mark.parametrize("make", [
    lambda: _flow(stochastic_sampling=True),
    lambda: EulerAncestralDiscreteScheduler(),
    lambda: DDPMScheduler(),
    lambda: DPMSolverMultistepScheduler(),
    lambda: DDIMScheduler(thresholding=True),
], ids=["stochastic flow", "euler ancestral", "ddpm", "dpm-solver", "thresholded ddim"])
def test_steps_with_more_than_one_pass_never_get_a_lane(make):
    sched = make()
    sched.set_timesteps(6)
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(4, 3, 4, 4)
    for t in sched.timesteps[:2]:
        if hasattr(sched, "scale_model_input"):
            sched.scale_model_input(x, t)
        fastguide.step(mo, t, x, scheduler=sched, guidance_scale=W, generator=None)
    assert _lane_of(sched) is False


def test_rescaled_cfg_never_gets_a_lane():
    sched = _flow()
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(4, 3, 4, 4)
    for t in sched.timesteps[:3]:
        fastguide.step(mo, t, x, scheduler=sched, guidance_scale=W, guidance_rescale=0.7)
    assert _lane_of(sched) is False


def test_lane_calls_are_counted_and_routed_calls_leave_it(monkeypatch):
    sched = _flow()
    x, mo = _warm(sched)
    out, t = torch.empty_like(x), sched.timesteps[2]
    with OpCounter() as counter:
        fastguide.step(mo, t, x, scheduler=sched, guidance_scale=W, out=out)
    assert counter.names == ["fastguide.guided_step"], counter.names
    runs = _general_runs(monkeypatch)
    with hooks.routed_through_torch_ops():
        fastguide.step(mo, sched.timesteps[3], x, scheduler=sched, guidance_scale=W, out=torch.empty_like(x))
    assert len(runs) == 1


def test_a_new_schedule_starts_without_a_lane(monkeypatch):
    sched = _flow()
    x, mo = _warm(sched)
    sched.set_timesteps(6)
    runs = _general_runs(monkeypatch)
    fastguide.step(mo, sched.timesteps[0], x, scheduler=sched, guidance_scale=W)
    assert len(runs) == 1


def test_copies_of_a_scheduler_build_their_own_lane(monkeypatch):
    """A copy's memo entry must not point into the original's table (which may be freed before the copy)."""
    sched = _flow()
    x, mo = _warm(sched)
    copied, pickled = copy.deepcopy(sched), pickle.loads(pickle.dumps(sched))
    del sched
    for other in (copied, pickled):
        assert _lane_of(other) is None
        theirs = copy.deepcopy(other)
        delattr(theirs, STATE_ATTR)
        for t in other.timesteps[2:5]:
            got = fastguide.step(mo, t, x, scheduler=other, guidance_scale=W, out=torch.empty_like(x))
            u, c = mo.chunk(2)
            torch.testing.assert_close(got, theirs.step(u + W * (c - u), t, x, return_dict=False)[0],
                                       rtol=1e-5, atol=1e-5)
        assert isinstance(_lane_of(other), repeat.Lane)
